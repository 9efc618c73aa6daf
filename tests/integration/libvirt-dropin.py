"""libvirt runs a VM on qcow2b without knowing it (issue 20): Debian 12's libvirt 9.0, a domain
whose `<emulator>` is the built qemu-system-x86_64 and whose disk is a qcow2 file, through
libvirt's own flows, once with qcow2b serving `qcow2` (the switch on) and once with QEMU's
qcow2 (off); the two runs are compared step by step.

libvirt starts QEMU with a scrubbed environment, so the switch's file is named through the
domain's `<qemu:env name='QCOW2B_CONF'>` (the off run names /dev/null, so a host's own
qcow2b.conf cannot turn it on); the test checks the emulator's environment and, through
query-blockstats, which driver serves the disk.

The guest is the benchmark's (bench/guest/build-guest.sh) booted with `guest.shell=1`: a shell
on the serial console, reached through a unix socket. Each I/O step writes a 256 KiB region of
/dev/vda with a pattern named after the step (O_DIRECT, fsync) and reads every region back in
the guest. After each step the image chain is checked with the system's qemu-img (QEMU's own
qcow2): `check` of every layer and the chain's content region by region.

Steps: define+start, guest I/O, domblkstat, snapshot-create-as --disk-only (libvirt makes
the overlay with blockdev-create), blockcommit --active --pivot, blockcopy --pivot (libvirt
makes the target with blockdev-create), checkpoint-create and backup-begin push full then
incremental (persistent bitmaps; targets made with blockdev-create), internal snapshot and
snapshot-revert, save and restore, shutdown. A step whose prerequisite failed is reported as
skipped. Exit status 0 only if every step passed in both runs.

Needs root, libvirtd and virtlogd running (started here with -d when absent), the guest
built. Usage: python3 tests/integration/libvirt-dropin.py [--only on|off] [--keep]
"""

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD_ROOT = os.environ.get("QCOW2B_BUILD_ROOT", os.path.join(ROOT, ".build"))
QEMU_SYSTEM = os.path.realpath(os.path.join(BUILD_ROOT, "bin", "qemu-system-x86_64"))
QEMU_IMG = os.path.realpath(os.path.join(BUILD_ROOT, "bin", "qemu-img"))
GUEST = os.path.join(BUILD_ROOT, "guest")
SYS_QEMU_IMG = "/usr/bin/qemu-img"
REGION = 256 * 1024
DISK = 64 * 1024 * 1024


class StepFailed(Exception):
    pass


def sh(*args, check=True, timeout=300):
    p = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    out = p.stdout.decode(errors="replace")
    if check and p.returncode != 0:
        raise StepFailed(f"{' '.join(args)} exited {p.returncode}: {out.strip()[-1500:]}")
    return out


def virsh(*args, check=True, timeout=300):
    return sh("virsh", "-c", "qemu:///system", *args, check=check, timeout=timeout)


def pattern(name):
    """The 256 KiB a step writes: its name repeated (the guest makes it with `yes`)."""
    line = (name + "\n").encode()
    return (line * (REGION // len(line) + 1))[:REGION]


class Guest:
    """The guest's shell on the serial console's unix socket."""

    def __init__(self, path, timeout=120):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(path)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise StepFailed(f"no serial console at {path}")
                time.sleep(0.2)
        self.buf = b""
        self.n = 0

    def wait_for(self, regex, timeout):
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(regex, self.buf)
            if m:
                self.buf = self.buf[m.end():]
                return m
            left = deadline - time.monotonic()
            if left <= 0:
                raise StepFailed(f"guest: no {regex!r} in {timeout} s; last output: "
                                 f"{self.buf[-400:].decode(errors='replace')}")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                continue
            if not chunk:
                raise StepFailed("guest console closed")
            self.buf += chunk

    def run(self, command, timeout=120):
        """Runs a shell command line; returns its output (the marker's status must be 0)."""
        self.n += 1
        tag = f"Q2B{self.n}"
        self.buf = b""
        self.sock.sendall(f"{command}; echo {tag}-END $?\n".encode())
        m = self.wait_for(rb"([\s\S]*?)" + tag.encode() + rb"-END (\d+)", timeout)
        out, status = m.group(1).decode(errors="replace"), int(m.group(2))
        if status != 0:
            raise StepFailed(f"guest: {command} exited {status}: {out[-600:]}")
        return out

    def write_region(self, index, name):
        self.run(f"yes {name} | head -c {REGION} | /usr/bin/dd of=/dev/vda bs=65536 "
                 f"seek={(index + 1) * 16} oflag=direct conv=fsync status=none")

    def region_md5(self, index):
        out = self.run(f"/usr/bin/dd if=/dev/vda bs=65536 skip={(index + 1) * 16} count=4 "
                       "iflag=direct status=none | md5sum")
        m = re.search(r"\b([0-9a-f]{32})\b", out)
        if not m:
            raise StepFailed(f"guest md5sum: {out}")
        return m.group(1)

    def close(self):
        self.sock.close()


class Run:
    """One run of every step, with the switch on or off."""

    def __init__(self, state, base_dir):
        self.state = state
        self.dir = os.path.join(base_dir, state)
        os.makedirs(self.dir)
        os.chmod(self.dir, 0o755)
        self.name = f"qcow2b-dropin-{state}-{os.getpid()}"
        self.conf = os.path.join(self.dir, "qcow2b.conf")
        with open(self.conf, "w") as f:
            f.write("serve-qcow2 = on\nbarrier = ordered\n" if state == "on" else "")
        self.console = os.path.join(self.dir, "console.sock")
        self.disk = os.path.join(self.dir, "disk.qcow2")
        # region index -> expected content (None: zeros, a region a revert took back)
        self.regions = {}
        self.results = []
        self.guest = None

    def path(self, name):
        return os.path.join(self.dir, name)

    # -- the domain ------------------------------------------------------------------------
    def domain_xml(self):
        kernel, initrd = self.path("vmlinuz"), self.path("initrd.cpio")
        return f"""<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{self.name}</name>
  <memory unit='MiB'>512</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 quiet panic=-1 guest.shell=1</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{QEMU_SYSTEM}</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='writeback'/>
      <source file='{self.disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='unix'>
      <source mode='bind' path='{self.console}'/>
      <target port='0'/>
    </serial>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-L'/>
    <qemu:arg value='{os.path.join(GUEST, "firmware")}'/>
    <qemu:env name='QCOW2B_CONF' value='{self.conf if self.state == "on" else "/dev/null"}'/>
  </qemu:commandline>
</domain>
"""

    def connect(self):
        self.guest = Guest(self.console)

    def qmp(self, command, **arguments):
        msg = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        out = virsh("qemu-monitor-command", self.name, json.dumps(msg))
        reply = json.loads(out)
        if "error" in reply:
            raise StepFailed(f"{command}: {reply['error']}")
        return reply["return"]

    def active_image(self):
        out = virsh("domblklist", self.name, "--details")
        for line in out.splitlines():
            f = line.split()
            if len(f) >= 4 and f[2] == "vda":
                return f[3]
        raise StepFailed(f"domblklist has no vda: {out}")

    # -- checks after every step -------------------------------------------------------------
    def check_chain(self, image=None, running=True):
        """QEMU's own qcow2 (the system's qemu-img) checks every layer of the chain clean and
        reads the expected regions from the whole chain."""
        image = image or self.active_image()
        lock = ["-U"] if running else []
        info = json.loads(sh(SYS_QEMU_IMG, "info", *lock, "--output=json", "--backing-chain",
                             image))
        for layer in info:
            if layer["format"] != "qcow2":
                raise StepFailed(f"{layer['filename']} is {layer['format']}, not qcow2")
            # While the VM runs, qcow2b's zero reserve (clusters counted ahead of need, given
            # back at close) shows as leaks to a reader beside it: exit 3, "no harm to data".
            # Corruption (2) or a failed check (1) never passes; a closed image must be clean.
            p = subprocess.run([SYS_QEMU_IMG, "check", *lock, "-f", "qcow2",
                                layer["filename"]], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
            if p.returncode not in ((0, 3) if running else (0,)):
                raise StepFailed(f"qemu-img check {layer['filename']} exited {p.returncode}: "
                                 f"{p.stdout.decode(errors='replace')[-800:]}")
        raw = self.path("chain.raw")
        sh(SYS_QEMU_IMG, "convert", *lock, "-O", "raw", image, raw)
        self.compare_regions(raw, f"the chain of {os.path.basename(image)}")
        os.unlink(raw)
        return [os.path.basename(layer["filename"]) for layer in info]

    def compare_regions(self, raw, what, regions=None):
        regions = self.regions if regions is None else regions
        with open(raw, "rb") as f:
            for index, want in regions.items():
                f.seek((index + 1) * 16 * 65536)
                got = f.read(REGION)
                expect = want if want is not None else bytes(REGION)
                if got != expect:
                    raise StepFailed(f"{what}: region {index} differs from "
                                     f"{'zeros' if want is None else want[:12]!r}")

    def check_guest_reads(self):
        for index, want in self.regions.items():
            expect = hashlib.md5(want if want is not None else bytes(REGION)).hexdigest()
            got = self.guest.region_md5(index)
            if got != expect:
                raise StepFailed(f"the guest reads region {index} wrong")

    def write(self, name):
        index = len(self.regions)
        self.guest.write_region(index, name)
        self.regions[index] = pattern(name)

    # -- the steps -------------------------------------------------------------------------
    def step_define_start(self):
        sh(QEMU_IMG, "create", "-q", "-f", "qcow2", self.disk, str(DISK))
        shutil.copy(os.path.join(GUEST, "vmlinuz"), self.path("vmlinuz"))
        shutil.copy(os.path.join(GUEST, "initrd.cpio"), self.path("initrd.cpio"))
        xml = self.path("domain.xml")
        with open(xml, "w") as f:
            f.write(self.domain_xml())
        t0 = time.monotonic()
        virsh("define", xml)
        t1 = time.monotonic()
        virsh("start", self.name)
        t2 = time.monotonic()
        self.connect()
        self.guest.wait_for(rb"SHELL-READY", 120)
        t3 = time.monotonic()
        self.timing = f"define {t1 - t0:.1f} s, start {t2 - t1:.1f} s, boot {t3 - t2:.1f} s"
        time.sleep(0.5)
        self.guest.run("true")
        # Which driver serves the disk: the emulator's environment and query-blockstats.
        pid = self.emulator_pid()
        env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        names = sorted(e.split(b"=", 1)[0].decode() for e in env if e)
        self.env_names = names
        nodes = self.qmp("query-named-block-nodes")
        fmt = [n for n in nodes if n["drv"] not in ("file",)]
        if not fmt or fmt[0]["drv"] != "qcow2":
            raise StepFailed(f"the disk's format node is {[n['drv'] for n in nodes]}")
        served = self.served_by()
        want = "qcow2b" if self.state == "on" else None
        if served != want:
            raise StepFailed(f"driver-specific statistics of {served}, expected {want}")
        return f"format node drv=qcow2, served by {served or 'QEMU qcow2'}; {self.timing}; " \
               f"emulator env: {','.join(names)}"

    def emulator_pid(self):
        with open(f"/run/libvirt/qemu/{self.name}.pid") as f:
            return int(f.read().strip())

    def served_by(self):
        for s in self.qmp("query-blockstats", **{"query-nodes": True}):
            spec = s.get("driver-specific", {})
            if spec.get("driver") in ("qcow2b",):
                return spec["driver"]
        return None

    def step_guest_io(self):
        self.write("start")
        self.check_guest_reads()
        return f"chain {self.check_chain()}"

    def step_domblkstat(self):
        out = virsh("domblkstat", self.name, "vda")
        stats = dict(line.split()[1:3] for line in out.splitlines() if len(line.split()) == 3)
        if int(stats.get("wr_req", 0)) < 1 or int(stats.get("rd_req", 0)) < 1:
            raise StepFailed(f"domblkstat: {out}")
        return f"wr_req {stats['wr_req']} rd_req {stats['rd_req']} flush " \
               f"{stats.get('flush_operations', '?')}"

    def step_snapshot_external(self):
        overlay = self.path("overlay.qcow2")
        virsh("snapshot-create-as", self.name, "ext1", "--disk-only", "--atomic",
              "--no-metadata", "--diskspec", f"vda,snapshot=external,file={overlay}")
        if self.active_image() != overlay:
            raise StepFailed(f"active image is {self.active_image()}")
        self.write("overlay")
        self.check_guest_reads()
        chain = self.check_chain()
        if len(chain) != 2:
            raise StepFailed(f"chain {chain}")
        return f"chain {chain}"

    def step_blockcommit(self):
        virsh("blockcommit", self.name, "vda", "--active", "--pivot", "--wait", timeout=300)
        if self.active_image() != self.disk:
            raise StepFailed(f"active image is {self.active_image()}")
        self.write("committed")
        self.check_guest_reads()
        return f"chain {self.check_chain()}"

    def step_blockcopy(self):
        copy = self.path("copy.qcow2")
        virsh("blockcopy", self.name, "vda", copy, "--format", "qcow2", "--wait", "--pivot",
              "--transient-job", timeout=300)
        if self.active_image() != copy:
            raise StepFailed(f"active image is {self.active_image()}")
        self.write("copied")
        self.check_guest_reads()
        return f"chain {self.check_chain()}"

    def backup(self, target, incremental=None):
        xml = self.path(os.path.basename(target) + ".xml")
        inc = f"<incremental>{incremental}</incremental>" if incremental else ""
        with open(xml, "w") as f:
            f.write(f"<domainbackup mode='push'>{inc}<disks><disk name='vda' type='file'>"
                    f"<target file='{target}'/><driver type='qcow2'/></disk></disks>"
                    "</domainbackup>")
        virsh("backup-begin", self.name, xml)
        deadline = time.monotonic() + 300
        while "Backup" in virsh("domjobinfo", self.name, check=False):
            if time.monotonic() > deadline:
                raise StepFailed("the backup job did not end")
            time.sleep(0.5)
        done = virsh("domjobinfo", self.name, "--completed")
        if "Completed" not in done:
            raise StepFailed(f"backup job: {done}")
        # An incremental target has the disk as its backing file, which the VM holds: -U.
        sh(SYS_QEMU_IMG, "check", "-U", "-f", "qcow2", target)

    def step_checkpoint_backup(self):
        virsh("checkpoint-create-as", self.name, "cp1")
        full = self.path("backup-full.qcow2")
        self.backup(full)
        raw = self.path("full.raw")
        sh(SYS_QEMU_IMG, "convert", "-O", "raw", full, raw)
        self.compare_regions(raw, "the full backup")
        os.unlink(raw)
        self.write("after-cp1")
        inc = self.path("backup-inc.qcow2")
        self.backup(inc, incremental="cp1")
        # The incremental backup holds the clusters written since cp1 (the new region) in its
        # own layer (libvirt gives it the disk as backing file) and reads, with that backing,
        # as the disk did at the backup.
        raw = self.path("inc.raw")
        sh(SYS_QEMU_IMG, "convert", "-U", "-O", "raw", inc, raw)
        self.compare_regions(raw, "the incremental backup with its backing file")
        os.unlink(raw)
        mapped = json.loads(sh(SYS_QEMU_IMG, "map", "-U", "--output=json", inc))
        data = sum(e["length"] for e in mapped if e["data"] and e["depth"] == 0)
        if not REGION <= data <= 4 * REGION:
            raise StepFailed(f"the incremental backup's own layer holds {data} bytes of data")
        # QEMU refuses to revert an internal snapshot while the disk has dirty bitmaps
        # ("Device has active dirty bitmaps"): the checkpoint goes, and its bitmap with it.
        virsh("checkpoint-delete", self.name, "cp1")
        bitmaps = [b["name"] for n in self.qmp("query-named-block-nodes")
                   for b in n.get("dirty-bitmaps", [])]
        if bitmaps:
            raise StepFailed(f"bitmaps left after checkpoint-delete: {bitmaps}")
        self.check_guest_reads()
        return f"full + incremental ({data} bytes of data); chain {self.check_chain()}"

    def step_internal_snapshot(self):
        virsh("snapshot-create-as", self.name, "int1", timeout=300)
        before = dict(self.regions)
        self.write("after-int1")
        newest = max(self.regions)
        pid = self.emulator_pid()
        virsh("snapshot-revert", self.name, "int1", timeout=300)
        if self.emulator_pid() != pid:
            # libvirt restarted the emulator (with -loadvm): a new console socket.
            self.guest.close()
            self.connect()
        self.guest.run("true", timeout=60)
        # The guest is back at the snapshot: the region written after it reads as zeros.
        self.regions = before
        self.regions[newest] = None
        self.check_guest_reads()
        listed = virsh("snapshot-list", self.name, "--name").split()
        info = json.loads(sh(SYS_QEMU_IMG, "info", "-U", "--output=json", self.active_image()))
        names = [s["name"] for s in info.get("snapshots", [])]
        if "int1" not in names:
            raise StepFailed(f"qemu-img info lists snapshots {names}")
        self.virsh_snapshots = listed
        return f"snapshot int1 in the image; chain {self.check_chain()}"

    def step_save_restore(self):
        state = self.path("saved.state")
        self.guest.close()
        virsh("save", self.name, state, timeout=300)
        self.check_chain(running=False)
        virsh("restore", state, timeout=300)
        self.connect()
        self.guest.run("true", timeout=60)
        self.write("restored")
        self.check_guest_reads()
        return f"chain {self.check_chain()}"

    def step_shutdown(self):
        self.guest.run("sync")
        self.guest.sock.sendall(b"poweroff -f\n")
        deadline = time.monotonic() + 120
        while "shut off" not in virsh("domstate", self.name):
            if time.monotonic() > deadline:
                raise StepFailed("the domain did not shut off")
            time.sleep(0.5)
        image = self.active_image()
        chain = self.check_chain(image, running=False)
        # Closed: the built qemu-img with the switch off (QEMU 7.2's qcow2) checks it too.
        env = dict(os.environ, QCOW2B_CONF="/dev/null")
        p = subprocess.run([QEMU_IMG, "check", "-f", "qcow2", image], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if p.returncode != 0:
            raise StepFailed(f"built qemu-img check (switch off): {p.stdout.decode()}")
        return f"chain {chain}"

    STEPS = [
        ("define+start", "step_define_start", []),
        ("guest I/O", "step_guest_io", ["define+start"]),
        ("domblkstat", "step_domblkstat", ["guest I/O"]),
        ("snapshot-create-as --disk-only", "step_snapshot_external", ["guest I/O"]),
        ("blockcommit --active --pivot", "step_blockcommit", ["snapshot-create-as --disk-only"]),
        ("blockcopy --pivot", "step_blockcopy", ["guest I/O"]),
        ("checkpoint-create, backup-begin full + incremental, checkpoint-delete",
         "step_checkpoint_backup",
         ["guest I/O"]),
        ("internal snapshot + snapshot-revert", "step_internal_snapshot", ["guest I/O"]),
        ("save + restore", "step_save_restore", ["guest I/O"]),
        ("shutdown", "step_shutdown", ["define+start"]),
    ]

    def go(self):
        passed = set()
        for title, method, needs in self.STEPS:
            missing = [n for n in needs if n not in passed]
            start = time.monotonic()
            if missing:
                result, detail = "skip", f"needs {', '.join(missing)}"
            else:
                try:
                    detail = getattr(self, method)()
                    result = "pass"
                    passed.add(title)
                except (StepFailed, subprocess.TimeoutExpired, OSError, ValueError) as e:
                    result, detail = "FAIL", str(e)
            self.results.append((title, result, detail, time.monotonic() - start))
            print(f"[{self.state}] {result:4} {title} ({time.monotonic() - start:.1f} s): "
                  f"{detail}", flush=True)

    def cleanup(self):
        if self.guest:
            try:
                self.guest.close()
            except OSError:
                pass
        virsh("destroy", self.name, check=False)
        virsh("undefine", self.name, "--snapshots-metadata", "--checkpoints-metadata",
              check=False)
        virsh("undefine", self.name, check=False)


def ensure_daemons():
    for daemon in ("virtlogd", "libvirtd"):
        if subprocess.run(["pgrep", "-x", daemon], stdout=subprocess.DEVNULL).returncode != 0:
            sh(daemon, "-d")
    deadline = time.monotonic() + 30
    while subprocess.run(["virsh", "-c", "qemu:///system", "list"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL).returncode != 0:
        if time.monotonic() > deadline:
            raise SystemExit("libvirtd does not answer")
        time.sleep(0.5)


def main():
    if os.geteuid() != 0:
        raise SystemExit("libvirt-dropin: needs root (libvirtd's system instance)")
    for tool in ("virsh", "libvirtd", "virtlogd"):
        if not shutil.which(tool):
            raise SystemExit(f"libvirt-dropin: {tool} missing (scripts/deps.sh installs libvirt)")
    for f in (QEMU_SYSTEM, QEMU_IMG, os.path.join(GUEST, "initrd.cpio")):
        if not os.path.exists(f):
            raise SystemExit(f"libvirt-dropin: {f} missing (scripts/build.sh, "
                             "bench/guest/build-guest.sh)")
    states = ["on", "off"]
    if "--only" in sys.argv:
        states = [sys.argv[sys.argv.index("--only") + 1]]
    ensure_daemons()
    base = tempfile.mkdtemp(prefix="qcow2b-libvirt.")
    os.chmod(base, 0o755)
    started = time.monotonic()
    runs = []
    try:
        for state in states:
            run = Run(state, base)
            runs.append(run)
            try:
                run.go()
            finally:
                run.cleanup()
    finally:
        if "--keep" not in sys.argv:
            shutil.rmtree(base, ignore_errors=True)
        else:
            print(f"kept {base}")
    print(f"\n{'step':70} " + " ".join(f"{r.state:>6}" for r in runs))
    bad = 0
    for i, (title, _, _) in enumerate(Run.STEPS):
        cells = [r.results[i][1] if i < len(r.results) else "-" for r in runs]
        bad += sum(c != "pass" for c in cells)
        print(f"{title:70} " + " ".join(f"{c:>6}" for c in cells))
    print(f"libvirt-dropin: {len(runs)} runs, {bad} steps not passed, "
          f"{time.monotonic() - started:.0f} s")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
