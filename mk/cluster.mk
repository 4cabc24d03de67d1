# Pacemaker/Corosync for the cluster tests (integration/cluster/) and the OCF agent
# (contrib/ocf/qsup).  Included by the top Makefile; its stamp is part of `deps`.
#
# * Service starts are blocked during the install (policy-rc.d exiting 101): the tests run
#   every node's corosync/pacemakerd themselves, inside namespaces.  A policy-rc.d that was
#   already there is left alone; one made here is removed again.
# * libxml2-utils: ocf-tester validates the agent's meta-data with xmllint.
# * pacemaker-remote conflicts with pacemaker as a package, so it is only downloaded and
#   unpacked under $(CLUSTER_REMOTE) (it links against the libraries pacemaker installs);
#   the harness runs $(CLUSTER_REMOTE)/usr/sbin/pacemaker-remoted from there.
CLUSTER_PACKAGES := corosync pacemaker pacemaker-cli-utils resource-agents fence-agents curl libxml2-utils
CLUSTER_BUILD := build/cluster
CLUSTER_REMOTE := $(CLUSTER_BUILD)/pacemaker-remote
# wait for another apt/dpkg (up to 10 min) instead of failing on its lock
CLUSTER_APT := DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -y -qq --no-install-recommends

.PHONY: cluster-deps cluster-clean demo-cluster bench-evacuation

# A 3-node evacuation under ping: crm_mon while it runs, then every node's qsup events
# (integration/demo_cluster.py).  Exit status 0 only when every guest was live-migrated.
demo-cluster: deps guest
	$(BIN)/python integration/demo_cluster.py

# integration/bench/evacuation.py: 8 nodes, 40 guests, migration-limit 1/2/4/8 (~15 min here)
bench-evacuation: deps guest
	$(BIN)/python integration/bench/evacuation.py

cluster-deps: $(STAMP)/cluster

$(STAMP)/cluster: mk/cluster.mk
	mkdir -p $(STAMP) $(CLUSTER_BUILD)
	set -e; made=; \
	if [ ! -e /usr/sbin/policy-rc.d ]; then \
	  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; made=1; \
	fi; \
	trap '[ -z "$$made" ] || rm -f /usr/sbin/policy-rc.d' EXIT; \
	$(CLUSTER_APT) install $(CLUSTER_PACKAGES) >/dev/null
	rm -rf $(CLUSTER_REMOTE) $(CLUSTER_BUILD)/pacemaker-remote_*.deb
	cd $(CLUSTER_BUILD) && apt-get -o DPkg::Lock::Timeout=600 -o APT::Sandbox::User=root -qq download pacemaker-remote
	dpkg-deb -x $(CLUSTER_BUILD)/pacemaker-remote_*.deb $(CLUSTER_REMOTE)
	test -x $(CLUSTER_REMOTE)/usr/sbin/pacemaker-remoted
	touch $@

cluster-clean:
	rm -rf $(CLUSTER_BUILD) $(STAMP)/cluster
