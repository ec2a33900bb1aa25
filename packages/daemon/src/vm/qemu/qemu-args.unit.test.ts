import assert from "node:assert/strict";
import { describe, it } from "node:test";
import {
  BASE_NODE,
  buildQemuArgs,
  FD_AGENT,
  FD_DISK,
  FD_QMP,
  kernelCommandLine,
  MEMFD_PATH,
  qemuCommand,
  SANDBOX_OPTION,
  TCG_TB_SIZE_MIB,
} from "./qemu-args.js";

const base = {
  vcpuCount: 2,
  memSizeMib: 1024,
  accel: "tcg" as const,
  kernel: "/img/vmlinuz",
  initrd: "/img/initrd.img",
  lowerDisks: 0,
  memPath: "/dev/shm/podflare/a.mem",
  tscKhz: 2_096_000,
  pidFile: "/vms/a/qemu.pid",
};

function value(args: string[], flag: string): string[] {
  return args.flatMap((a, i) => (a === flag ? [args[i + 1] ?? ""] : []));
}

describe("QEMU arguments", () => {
  it("builds a network-less microvm with inherited channels", () => {
    const args = buildQemuArgs(base);
    assert.ok(args.includes("-nodefaults"));
    assert.equal(value(args, "-netdev").length, 0);
    assert.ok(!value(args, "-device").some((d) => /net/.test(d)), "no network device at all");
    assert.ok(value(args, "-chardev").includes(`socket,id=qmp,fd=${FD_QMP},server=off`));
    assert.ok(value(args, "-chardev").includes(`socket,id=agent,fd=${FD_AGENT},server=off`));
    assert.deepEqual(value(args, "-smp"), ["2"]);
    assert.deepEqual(value(args, "-m"), ["1024M"]);
    assert.match(
      value(args, "-object")[0] ?? "",
      /mem-path=\/dev\/shm\/podflare\/a\.mem,share=on$/,
    );
    assert.match(value(args, "-drive")[0] ?? "", /^id=root,.*file.filename=\/dev\/fdset\/1/);
    assert.deepEqual(value(args, "-accel"), [`tcg,thread=multi,tb-size=${TCG_TB_SIZE_MIB}`]);
    assert.deepEqual(
      value(args, "-pidfile"),
      ["/vms/a/qemu.pid"],
      "the VM's directory is in its command line",
    );
    assert.ok(!args.includes("-incoming"));
  });

  it("uses KVM with the host CPU and no TSC workarounds when asked", () => {
    const args = buildQemuArgs({ ...base, accel: "kvm" });
    assert.deepEqual(value(args, "-accel"), ["kvm"]);
    assert.deepEqual(value(args, "-cpu"), ["host"]);
    assert.doesNotMatch(kernelCommandLine({ accel: "kvm", tscKhz: 1 }), /tsc_early_khz/);
  });

  it("passes the TSC frequency under TCG so boots cannot hang in calibration", () => {
    assert.match(kernelCommandLine(base), /tsc_early_khz=2096000 .*clocksource=tsc tsc=reliable/);
  });

  it("prepares fork children: devices-only state, paused after the load", () => {
    const args = buildQemuArgs({
      ...base,
      incoming: true,
      memShared: false,
      deviceStateOnly: true,
    });
    assert.deepEqual(value(args, "-incoming"), ["defer"]);
    assert.ok(args.includes("-S"));
    assert.deepEqual(value(args, "-global"), ["migration.send-configuration=off"]);
    assert.match(value(args, "-M")[0] as string, /,suppress-vmdesc=on$/);
  });

  it("prepares restores: -incoming defer and a private memory mapping", () => {
    const args = buildQemuArgs({ ...base, incoming: true, memShared: false });
    assert.deepEqual(value(args, "-incoming"), ["defer"]);
    assert.match(value(args, "-object")[0] ?? "", /share=off$/);
    assert.deepEqual(value(args, "-kernel"), [], "a restore loads no boot blobs");
    assert.deepEqual(
      value(args, "-kernel").length + value(buildQemuArgs(base), "-kernel").length,
      1,
    );
  });

  it("rejects paths that would inject QEMU options and absurd shapes", () => {
    assert.throws(() => buildQemuArgs({ ...base, memPath: "/x,share=on" }), /comma/);
    assert.throws(() => buildQemuArgs({ ...base, lowerDisks: -1 }), RangeError);
    assert.throws(() => buildQemuArgs({ ...base, lowerDisks: 1.5 }), RangeError);
    assert.throws(() => buildQemuArgs({ ...base, vcpuCount: 0 }), RangeError);
    assert.throws(() => buildQemuArgs({ ...base, memSizeMib: 64 }), RangeError);
  });
});

describe("QEMU disk chain by file descriptor", () => {
  it("names no file: fdsets for the top (read-write and read-only) and each layer below", () => {
    const args = buildQemuArgs({ ...base, lowerDisks: 3 });
    assert.deepEqual(value(args, "-add-fd"), [
      `fd=${FD_DISK},set=1,opaque=rw`,
      `fd=${FD_DISK + 1},set=1,opaque=ro`,
      `fd=${FD_DISK + 2},set=2,opaque=ro`,
      `fd=${FD_DISK + 3},set=3,opaque=ro`,
      `fd=${FD_DISK + 4},set=4,opaque=ro`,
    ]);
    const drive = (value(args, "-drive")[0] ?? "").split(",");
    assert.ok(drive.includes("file.filename=/dev/fdset/1"));
    assert.ok(drive.includes("file.auto-read-only=off"), "the top opens read-write at once");
    assert.ok(drive.includes("backing.file.filename=/dev/fdset/2"));
    assert.ok(drive.includes("backing.backing.file.filename=/dev/fdset/3"));
    assert.ok(drive.includes("backing.backing.backing.file.filename=/dev/fdset/4"));
    assert.ok(drive.includes(`backing.backing.backing.node-name=${BASE_NODE}`));
    for (const d of ["backing.", "backing.backing.", "backing.backing.backing."])
      assert.ok(drive.includes(`${d}read-only=on`), `${d} read-only`);
    assert.ok(!args.some((a) => a.includes(".qcow2")), "no layer path on the command line");
  });

  it("leaves a cold boot's overlay to name the public image below it", () => {
    const drive = value(buildQemuArgs(base), "-drive")[0] ?? "";
    assert.ok(!drive.includes("backing"));
    assert.equal(value(buildQemuArgs(base), "-add-fd").length, 2);
  });
});

describe("QEMU hardening arguments", () => {
  it("turns QEMU's seccomp sandbox on with every deny option, first", () => {
    const args = buildQemuArgs(base);
    assert.deepEqual(value(args, "-sandbox"), [SANDBOX_OPTION]);
    assert.equal(args[0], "-sandbox");
    for (const opt of [
      "obsolete=deny",
      "elevateprivileges=deny",
      "spawn=deny",
      "resourcecontrol=deny",
    ])
      assert.ok(SANDBOX_OPTION.split(",").includes(opt), opt);
    assert.deepEqual(value(buildQemuArgs({ ...base, sandbox: false }), "-sandbox"), []);
  });

  it("bounds the TCG translation cache (the cgroup memory limit counts on it)", () => {
    assert.deepEqual(value(buildQemuArgs(base), "-accel"), [
      `tcg,thread=multi,tb-size=${TCG_TB_SIZE_MIB}`,
    ]);
  });

  it("maps an inherited memfd by its /proc/self/fd path", () => {
    const args = buildQemuArgs({ ...base, memPath: MEMFD_PATH, memShared: false, incoming: true });
    assert.match(value(args, "-object")[0] ?? "", /mem-path=\/proc\/self\/fd\/7,share=off$/);
  });

  it("runs QEMU under setpriv: its own uid/gid, no groups, no_new_privs, parent-death signal", () => {
    const cmd = qemuCommand("qemu-system-x86_64", ["-x"], {
      nice: 10,
      creds: { uid: 2_000_000_005, gid: 2_000_000_005 },
    });
    assert.deepEqual(cmd, [
      "nice",
      "-n",
      "10",
      "setpriv",
      "--reuid",
      "2000000005",
      "--regid",
      "2000000005",
      "--clear-groups",
      "--no-new-privs",
      "--pdeathsig",
      "KILL",
      "--",
      "qemu-system-x86_64",
      "-x",
    ]);
    assert.deepEqual(qemuCommand("q", [], {}), ["setpriv", "--pdeathsig", "KILL", "--", "q"]);
    assert.throws(() => qemuCommand("q", [], { creds: { uid: 0, gid: 0 } }), RangeError);
    assert.throws(() => qemuCommand("q", [], { creds: { uid: 2 ** 32 - 1, gid: 5 } }), RangeError);
  });
});
