"""The administrator's switch (qemu-patches/0020, src/glue/serve_qcow2.rs): qcow2b serves the
format name `qcow2` when its configuration file says `serve-qcow2 = on`, in every tool.

Both states, each tool: with the switch off (no file, an empty file, `serve-qcow2 = off`) the
format name `qcow2` is QEMU's qcow2; with it on, qcow2b's. What tells them apart is what only
one of them does: qcow2b refuses the barrier options on a served node and names the file
(QEMU's qcow2 says it does not know the option), and only qcow2b reports driver-specific
statistics (query-blockstats `"driver": "qcow2b"`, qemu-io `info`'s barrier mode). With it
on: `-blockdev driver=qcow2` with every member of QEMU 7.2's BlockdevOptionsQcow2, `-drive
format=qcow2`, QMP blockdev-add, probing, qemu-img create/convert/check -f qcow2, qemu-nbd and
qemu-storage-daemon; query-block, query-named-block-nodes and qemu-img info show qcow2 as
management expects. The file's errors stop each tool at start with a message naming the file
and line. Every image stays plain qcow2: the system's qemu-img (QEMU's own qcow2) and the
built one with the switch off check it clean and read the data written with it on.
"""

import json
import os
import subprocess
import sys
import time

from qemu_tools import (BIN, QEMU_IMG, QEMU_IO, SYS_QEMU_IMG, SYS_QEMU_IO, Failure, Scratch,
                        main, run)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
import benchlib as bl  # noqa: E402

QEMU_SYSTEM = os.path.join(BIN, "qemu-system-x86_64")
QEMU_NBD = os.path.join(BIN, "qemu-nbd")
QSD = os.path.join(BIN, "qemu-storage-daemon")


def env_with(conf):
    env = dict(os.environ)
    env["QCOW2B_CONF"] = conf
    return env


def tool(conf, *args, check=True, timeout=120):
    """Runs a built tool with QCOW2B_CONF=conf; returns (status, output)."""
    p = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       timeout=timeout, env=env_with(conf))
    out = p.stdout.decode(errors="replace")
    if p.returncode < 0:
        raise Failure(f"{' '.join(args)} died of signal {-p.returncode}:\n{out}")
    if check and p.returncode != 0:
        raise Failure(f"QCOW2B_CONF={conf} {' '.join(args)} exited {p.returncode}:\n{out}")
    return p.returncode, out


def expect(cond, what, out=""):
    if not cond:
        raise Failure(f"{what}\n{out[-3000:]}")


class Vm:
    """A system emulator without a guest (accel qtest) with QMP, under one configuration."""

    def __init__(self, scratch, conf, args):
        self.qmp_path = scratch.path(f"qmp.{time.monotonic_ns()}")
        cmd = [QEMU_SYSTEM, "-M", "none", "-accel", "qtest", "-nodefaults", "-display", "none",
               "-qmp", f"unix:{self.qmp_path},server=on,wait=off", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env_with(conf))
        try:
            self.qmp = bl.Qmp(self.qmp_path, timeout=20)
        except Exception:
            self.proc.kill()
            raise Failure("the emulator did not start:\n" + self.proc.communicate()[0].decode())

    def cmd(self, name, **arguments):
        reply = self.qmp.cmd(name, **arguments)
        if "error" in reply:
            raise Failure(f"{name} {json.dumps(arguments)}: {reply['error']}")
        return reply["return"]

    def quit(self):
        self.qmp.cmd("quit")
        self.proc.wait(timeout=60)


def stats_driver(vm, node):
    """The driver-specific statistics' driver name of a node (None without any)."""
    for s in vm.cmd("query-blockstats", **{"query-nodes": True}):
        if s.get("node-name") == node:
            return s.get("driver-specific", {}).get("driver"), s.get("driver-specific")
    raise Failure(f"query-blockstats has no node {node}")


def served_by_qcow2b(conf, image):
    """What serves `-f qcow2` in qemu-io under `conf`: 'qcow2b' when it reports a barrier
    mode in its info, 'qcow2' when the qcow2 driver refuses barrier as an unknown option."""
    _, info = tool(conf, QEMU_IO, "-f", "qcow2", "-r", "-c", "info", image)
    return "barrier mode:" in info


def the_switch_off(s, image):
    """Off: QEMU's qcow2 serves qcow2 in every tool (no file, empty, serve-qcow2 = off)."""
    empty = s.path("empty.conf")
    with open(empty, "w") as f:
        f.write("# qcow2b: nothing set, the switch stays off\n\n")
    off = s.path("off.conf")
    with open(off, "w") as f:
        f.write("serve-qcow2 = off\nbarrier = txg\n")
    for conf in ("/dev/null", empty, off):
        expect(not served_by_qcow2b(conf, image), f"{conf}: qemu-io -f qcow2 reports qcow2b")
        status, out = tool(conf, QEMU_IO, "-c", "info", "--image-opts",
                           f"driver=qcow2,file.filename={image},barrier=flush", check=False)
        expect(status != 0 and "does not support the option 'barrier'" in out,
               f"{conf}: qcow2 took the barrier option", out)
        _, out = tool(conf, QEMU_IMG, "info", "--output=json", image)
        expect(json.loads(out)["format"] == "qcow2", "qemu-img info: not qcow2", out)
    # The emulator: -blockdev driver=qcow2 has no driver-specific statistics (QEMU's qcow2).
    vm = Vm(s, off, ["-blockdev", f"driver=qcow2,node-name=q0,file.driver=file,"
                                  f"file.filename={image}"])
    driver, _ = stats_driver(vm, "q0")
    expect(driver is None, f"switch off: driver-specific statistics of {driver}")
    vm.quit()
    print("switch off: QEMU's qcow2 serves qcow2 (no file, empty file, serve-qcow2 = off)")


def the_switch_on(s, image, on):
    """On: qcow2b serves qcow2 in every tool."""
    # qemu-io by name and by probing; its info shows qcow2b's mode (the file's).
    _, out = tool(on, QEMU_IO, "-f", "qcow2", "-c", "write -P 0x51 1M 128k", "-c", "info", image)
    expect("format name: qcow2" in out and "barrier mode: ordered" in out,
           "qemu-io -f qcow2: not qcow2b in the file's ordered mode", out)
    _, out = tool(on, QEMU_IO, "-r", "-c", "info", "-c", "read -P 0x51 1M 128k", image)
    expect("barrier mode: ordered" in out and "Pattern verification failed" not in out,
           "probing does not pick qcow2b", out)
    # A barrier option on a served node: refused, naming the file.
    status, out = tool(on, QEMU_IO, "-c", "info", "--image-opts",
                       f"driver=qcow2,file.filename={image},barrier=flush", check=False)
    expect(status != 0 and "'barrier' is not an option of format 'qcow2' served by qcow2b"
           in out and on in out, "the barrier option on a served node", out)
    # qemu-img: info as qcow2's, create, convert and check through qcow2b.
    _, out = tool(on, QEMU_IMG, "info", "--output=json", image)
    j = json.loads(out)
    expect(j["format"] == "qcow2" and j["format-specific"]["type"] == "qcow2"
           and j["format-specific"]["data"]["compat"] == "1.1",
           "qemu-img info: not what management expects of qcow2", out)
    _, out = tool(on, QEMU_IMG, "info", image)
    expect("file format: qcow2\n" in out and "Format specific information:" in out,
           "qemu-img info (human)", out)
    made = s.path("made.qcow2")
    tool(on, QEMU_IMG, "create", "-f", "qcow2", "-o", "cluster_size=4096,lazy_refcounts=on",
         made, "8M")
    expect(served_by_qcow2b(on, made), "qemu-img create -f qcow2 image not served by qcow2b")
    converted = s.path("converted.qcow2")
    tool(on, QEMU_IMG, "convert", "-f", "qcow2", "-O", "qcow2", image, converted)
    tool(on, QEMU_IMG, "check", "-f", "qcow2", converted)
    # qemu-nbd and qemu-storage-daemon: the barrier option tells which driver they have.
    status, out = tool(on, QEMU_NBD, "--image-opts",
                       f"driver=qcow2,file.filename={image},barrier=flush", check=False,
                       timeout=30)
    expect(status != 0 and "served by qcow2b" in out, "qemu-nbd -f qcow2 is not qcow2b", out)
    status, out = tool(on, QSD, "--blockdev",
                       f"driver=file,node-name=f,filename={image}", "--blockdev",
                       "driver=qcow2,node-name=q,file=f,barrier=flush", check=False, timeout=30)
    expect(status != 0 and "'barrier'" in out, "qsd: barrier unchecked", out)
    qsd_qmp = s.path("qsd.qmp")
    qsd = subprocess.Popen([QSD, "--blockdev", f"driver=file,node-name=f,filename={image}",
                            "--blockdev", "driver=qcow2,node-name=q,file=f",
                            "--chardev", f"socket,id=m,path={qsd_qmp},server=on,wait=off",
                            "--monitor", "chardev=m"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env_with(on))
    try:
        qmp = bl.Qmp(qsd_qmp, timeout=20)
        reply = qmp.cmd("query-blockstats", **{"query-nodes": True})
        spec = [b.get("driver-specific", {}) for b in reply["return"] if b["node-name"] == "q"]
        expect(spec and spec[0].get("driver") == "qcow2b" and spec[0].get("barrier-mode") == "ordered",
               "qemu-storage-daemon: driver=qcow2 not served by qcow2b", json.dumps(reply))
        qmp.cmd("quit")
        qsd.wait(timeout=30)
    finally:
        if qsd.poll() is None:
            qsd.kill()

    # The emulator: -drive format=qcow2, -blockdev driver=qcow2 with every member of
    # BlockdevOptionsQcow2 (7.2), and QMP blockdev-add of a qcow2 node with a data file.
    secret = "sec0"
    luks = s.path("luks.qcow2")
    tool(on, QEMU_IMG, "create", "-f", "qcow2", "--object", f"secret,id={secret},data=pw",
         "-o", f"encrypt.format=luks,encrypt.key-secret={secret},encrypt.cipher-mode=cbc,"
               "encrypt.ivgen-alg=essiv,encrypt.iter-time=10", luks, "4M")
    data_img, data_raw = s.path("withdata.qcow2"), s.path("withdata.raw")
    tool(on, QEMU_IMG, "create", "-f", "qcow2", "-o", f"data_file={data_raw}", data_img, "4M")
    every_member = ("driver=qcow2,node-name=full,file.driver=file,"
                    f"file.filename={luks},lazy-refcounts=on,pass-discard-request=on,"
                    "pass-discard-snapshot=on,pass-discard-other=off,overlap-check=all,"
                    "cache-size=2097152,l2-cache-size=1048576,l2-cache-entry-size=4096,"
                    "cache-clean-interval=30,"
                    f"encrypt.format=luks,encrypt.key-secret={secret}")
    vm = Vm(s, on, ["-object", f"secret,id={secret},data=pw",
                    "-drive", f"if=none,id=d0,format=qcow2,file={image},refcount-cache-size=262144",
                    "-blockdev", every_member])
    vm.cmd("blockdev-add", **{"driver": "qcow2", "node-name": "dfile",
                              "file": {"driver": "file", "filename": data_img},
                              "data-file": {"driver": "file", "filename": data_raw}})
    blocks = {b["device"]: b for b in vm.cmd("query-block")}
    ins = blocks["d0"]["inserted"]
    expect(ins["drv"] == "qcow2" and ins["image"]["format"] == "qcow2"
           and ins["image"]["format-specific"]["type"] == "qcow2",
           "query-block: not what management expects of qcow2", json.dumps(ins))
    nodes = {n["node-name"]: n for n in vm.cmd("query-named-block-nodes")}
    for name in ("full", "dfile", ins["node-name"]):
        expect(nodes[name]["drv"] == "qcow2"
               and nodes[name]["image"]["format-specific"]["type"] == "qcow2",
               f"query-named-block-nodes {name}", json.dumps(nodes[name]))
    expect(nodes["full"]["encrypted"], "the LUKS node is not encrypted",
           json.dumps(nodes["full"]))
    expect(nodes["dfile"]["image"]["format-specific"]["data"].get("data-file") == data_raw,
           "the data file is not shown", json.dumps(nodes["dfile"]))
    for node in ("full", "dfile", ins["node-name"]):
        driver, spec = stats_driver(vm, node)
        expect(driver == "qcow2b" and spec["barrier-mode"] == "ordered"
               and "host-fdatasyncs" in spec["counters"],
               f"query-blockstats {node}: qcow2b's counters missing", json.dumps(spec))
    # A reopen keeps the file's settings: a mutable qcow2 option changes, the mode stays.
    vm.cmd("blockdev-add", driver="file", filename=made, **{"node-name": "pf"})
    vm.cmd("blockdev-add", driver="qcow2", file="pf", **{"node-name": "plain"})
    vm.cmd("blockdev-reopen", options=[{"driver": "qcow2", "node-name": "plain", "file": "pf",
                                        "l2-cache-size": 65536}])
    driver, spec = stats_driver(vm, "plain")
    expect(driver == "qcow2b" and spec["barrier-mode"] == "ordered", "after a reopen", json.dumps(spec))
    reply = vm.qmp.cmd("blockdev-add", driver="qcow2", **{"node-name": "bad",
                       "file": {"driver": "file", "filename": image}, "barrier": "flush"})
    expect("error" in reply, "QMP took barrier for driver qcow2", json.dumps(reply))
    vm.quit()
    # The file's mode applies to every served node: txg with its bounds, and txg's refusal
    # of an image with an external data file (its message, not a fallback).
    txg = s.path("txg.conf")
    with open(txg, "w") as f:
        f.write("serve-qcow2 = on\nbarrier = txg\ntxg-max-bytes = 8M\ntxg-max-age-ms = 500\n")
    _, out = tool(txg, QEMU_IO, "-f", "qcow2", "-r", "-c", "info", image)
    expect("barrier mode: txg" in out, "the file's txg mode", out)
    status, out = tool(txg, QEMU_IO, "-f", "qcow2", "-c", "info", data_img, check=False)
    expect(status != 0 and "barrier=txg is not available for an image with an external data "
           "file" in out, "txg with a data file", out)
    print("switch on: qcow2b serves qcow2 in qemu-io, qemu-img, qemu-nbd, qemu-storage-daemon "
          "and the emulator (-drive, -blockdev with every BlockdevOptionsQcow2 member, "
          "blockdev-add), probing too")
    return [image, made, converted, data_img]


def config_errors(s, image):
    """A bad file stops every tool at start and names the file and the line."""
    cases = [
        ("serve-qcow2 = yes\n", "line 1: 'serve-qcow2' is 'on' or 'off', not 'yes'"),
        ("serve-qcow2 = on\nbariier = txg\n", "line 2: unknown setting 'bariier'"),
        ("serve-qcow2 = on\nbarrier = txg\ntxg-max-bytes = 1K\n", "txg-max-bytes 1024 is below 1 MiB"),
        ("barrier = flush\n", "'serve-qcow2 = on' or 'serve-qcow2 = off' is missing"),
        ("serve-qcow2 = on\nbarrier = barrierfs\n", "needs barrierfs-syscall"),
    ]
    for i, (text, want) in enumerate(cases):
        conf = s.path(f"bad{i}.conf")
        with open(conf, "w") as f:
            f.write(text)
        for args in ([QEMU_IMG, "info", image], [QEMU_IO, "-c", "info", image],
                     [QEMU_SYSTEM, "-M", "none", "-display", "none", "-S"]):
            status, out = tool(conf, *args, check=False, timeout=30)
            expect(status == 1 and f"qcow2b configuration {conf}" in out and want in out,
                   f"{os.path.basename(args[0])} with {text!r}: exit {status}", out)
    missing = s.path("missing.conf")
    status, out = tool(missing, QEMU_IMG, "info", image, check=False)
    expect(status == 1 and "(named by QCOW2B_CONF)" in out, "a missing named file", out)
    print(f"config errors: {len(cases)} bad files and a missing one stop qemu-img, qemu-io and "
          "the emulator at start, naming file and line")


def body():
    with Scratch() as s:
        on = s.path("on.conf")
        with open(on, "w") as f:
            f.write("# qcow2b serves qcow2 here\nserve-qcow2 = on\nbarrier = ordered\n"
                    "buffer-size = 8M   # a small buffer\n")
        image = s.path("disk.qcow2")
        run(SYS_QEMU_IMG, "create", "-q", "-f", "qcow2", image, "16M")
        run(SYS_QEMU_IO, "-f", "qcow2", "-c", "write -P 0x0f 0 64k", image)
        the_switch_off(s, image)
        images = the_switch_on(s, image, on)
        config_errors(s, image)
        # The images stay plain qcow2: QEMU's own qcow2 (the system's and the built one with
        # the switch off) checks them clean and reads what qcow2b wrote.
        for img in images:
            run(SYS_QEMU_IMG, "check", "-f", "qcow2", img)
            tool("/dev/null", QEMU_IMG, "check", "-f", "qcow2", img)
        for img in (image, s.path("converted.qcow2")):
            run(SYS_QEMU_IO, "-f", "qcow2", "-r", "-c", "read -P 0x51 1M 128k",
                "-c", "read -P 0x0f 0 64k", img)
        run(SYS_QEMU_IMG, "compare", "-f", "qcow2", "-F", "qcow2", image,
            s.path("converted.qcow2"))
        print("images: plain qcow2 for the system's qemu-img "
              f"({run(SYS_QEMU_IMG, '--version')[1].split(chr(10))[0]}) and the built one "
              "with the switch off")


if __name__ == "__main__":
    main(body)
