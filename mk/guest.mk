# The real test guest: a Debian cloud kernel and a busybox initramfs, cached in $(GUEST_DIR)
# (never committed). integration/guest/build.sh skips the work when its outputs are newer than
# its inputs; GUEST_REBUILD=1 forces a rebuild (and picks up a newer kernel package).
GUEST_DIR := build/guest
GUEST_KERNEL := $(GUEST_DIR)/vmlinuz
GUEST_INITRD := $(GUEST_DIR)/initrd.img

.PHONY: guest guest-clean guest-shell

guest:
	bash integration/guest/build.sh

guest-clean:
	rm -rf $(GUEST_DIR)

# Boot the guest by hand with a shell on the serial console, no NIC. Quit with Ctrl-A X.
guest-shell: guest
	qemu-system-x86_64 -accel tcg -m 256 -nographic -no-reboot \
		-kernel $(GUEST_KERNEL) -initrd $(GUEST_INITRD) \
		-append "console=ttyS0 quiet panic=-1 guest.shell=1"
