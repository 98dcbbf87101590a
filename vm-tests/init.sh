#!/bin/busybox sh
# /init of the vm-tests initramfs (built by `cargo xtask vm-test`). It mounts this host's
# root read-only over 9p as the guest's root, the work tree read-write at the same path,
# and runs one script there (xnet.run=) with the guest's kernel, then powers off. The
# runner reads "XNET-VM-EXIT=<status>" from the serial console.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev

arg() { sed -n "s/.*$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
WORK=$(arg xnet.work)
RUN=$(arg xnet.run)
MODULES=$(arg xnet.modules)
fail() {
	echo "xnet-vm: $*"
	echo "XNET-VM-EXIT=125"
	poweroff -f
}

# Just what mounting the host needs; everything else loads on demand (below).
for m in $(cat /modules.order); do
	insmod "/m/$m" || fail "insmod $m"
done

R=/newroot
mkdir -p $R
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144 hostroot $R || fail "mounting the host root"
for d in tmp run; do mount -t tmpfs tmpfs "$R/$d"; done
# After the tmpfs mounts: a work tree under /tmp (a CI clone, say) stays visible.
mkdir -p "$R$WORK" 2>/dev/null
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 work "$R$WORK" || fail "mounting $WORK"
mount -t proc proc $R/proc
mount -t sysfs sys $R/sys
mount -t devtmpfs dev $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts devpts $R/dev/pts
mount -t tmpfs tmpfs $R/dev/shm
mount -t bpf bpf $R/sys/fs/bpf

# The kernel's module loader runs in this initramfs: hand it to the host's kmod with the
# guest kernel's modules from the work tree.
cat >/bin/modprobe-vm <<EOF
#!/bin/busybox sh
exec /bin/busybox chroot $R /sbin/modprobe -d $MODULES "\$@"
EOF
chmod +x /bin/modprobe-vm
echo /bin/modprobe-vm >/proc/sys/kernel/modprobe
# devtmpfs makes /dev/net/tun only once tun is loaded (charon's userspace ESP opens it).
/bin/modprobe-vm tun || fail "modprobe tun"
ip link set lo up

echo "xnet-vm: running $RUN"
env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=dumb \
	chroot $R /bin/bash "$RUN"
echo "XNET-VM-EXIT=$?"
poweroff -f
