import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { buildQemuArgs, FD_AGENT, FD_QMP, kernelCommandLine } from "./qemu-args.js";

const base = {
  vcpuCount: 2,
  memSizeMib: 1024,
  accel: "tcg" as const,
  kernel: "/img/vmlinuz",
  initrd: "/img/initrd.img",
  rootDisk: "/vms/a/root.qcow2",
  rootDiskFormat: "qcow2" as const,
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
    assert.match(value(args, "-drive")[0] ?? "", /file=\/vms\/a\/root\.qcow2,format=qcow2/);
    assert.deepEqual(value(args, "-accel"), ["tcg,thread=multi"]);
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
    assert.throws(() => buildQemuArgs({ ...base, rootDisk: "/x,format=raw" }), /comma/);
    assert.throws(() => buildQemuArgs({ ...base, vcpuCount: 0 }), RangeError);
    assert.throws(() => buildQemuArgs({ ...base, memSizeMib: 64 }), RangeError);
  });
});
