# The real test guest: a Debian cloud kernel and a busybox initramfs, cached in $(GUEST_DIR)
# (never committed). integration/guest/build.sh skips the work when its outputs are newer than
# its inputs (build.sh, init, memcheck.c, busybox); GUEST_REBUILD=1 forces a rebuild (and picks
# up a newer kernel package). It needs gcc + libc6-dev (APT_PACKAGES) for the static memcheck.
GUEST_DIR := build/guest
GUEST_KERNEL := $(GUEST_DIR)/vmlinuz
GUEST_INITRD := $(GUEST_DIR)/initrd.img

.PHONY: guest guest-clean guest-shell

guest:
	bash integration/guest/build.sh

guest-clean:
	rm -rf $(GUEST_DIR)

# Extra kernel command line for guest-shell, e.g. GUEST_APPEND="guest.dirty=50 guest.nmi_panic=1"
GUEST_APPEND ?=

# Boot the guest by hand with a shell on the serial console, no NIC, pvpanic as qsup gives it.
# Quit with Ctrl-A X.
guest-shell: guest
	qemu-system-x86_64 -accel tcg -m 256 -nographic -no-reboot \
		-device pvpanic-pci -action panic=pause \
		-kernel $(GUEST_KERNEL) -initrd $(GUEST_INITRD) \
		-append "console=ttyS0 quiet panic=-1 guest.shell=1 $(GUEST_APPEND)"
