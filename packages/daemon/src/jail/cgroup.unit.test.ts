import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { QEMU_OVERHEAD_MIB } from "../vm/qemu/sizing.js";
import {
  cgroupLayout,
  niceFactor,
  parseMountinfo,
  parseProcCgroup,
  scaledShares,
  vmCgroupLimits,
} from "./cgroup.js";

const MOUNTINFO_V1 = `30 22 0:27 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
31 30 0:28 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
34 30 0:31 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
38 30 0:35 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 30 0:37 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw`;
const SELF_V1 = `9:name=systemd:/
8:pids:/
4:memory:/process_api/f221
1:cpu:/
0::/`;

describe("cgroup limits", () => {
  it("memory is twice guest RAM (private + template pages) plus QEMU's overhead; pids and CPU follow the vCPUs", () => {
    const l = vmCgroupLimits({ vcpuCount: 2, memSizeMib: 1024 }, QEMU_OVERHEAD_MIB);
    assert.equal(l.memoryBytes, (2 * 1024 + QEMU_OVERHEAD_MIB) * 1024 * 1024);
    assert.equal(l.pidsMax, 98);
    assert.equal(l.cpuQuotaUs, 200_000);
    assert.equal(l.cpuPeriodUs, 100_000);
    assert.equal(l.cpuShares, 2048);
    assert.equal(l.cpuWeight, 200);
    assert.equal(
      vmCgroupLimits({ vcpuCount: 1, memSizeMib: 256 }, 100).memoryBytes,
      612 * 1024 * 1024,
    );
  });

  it("scales the group weight like the scheduler scales nice", () => {
    assert.equal(niceFactor(0), 1);
    const l = vmCgroupLimits({ vcpuCount: 1, memSizeMib: 256 }, QEMU_OVERHEAD_MIB);
    const s = scaledShares(l, 10);
    // nice 10 is weight 110 against 1024 for nice 0 in the kernel's table.
    assert.ok(s.shares >= 105 && s.shares <= 115, String(s.shares));
    assert.ok(s.weight >= 10 && s.weight <= 11, String(s.weight));
    assert.deepEqual(scaledShares(l, 0), { shares: 1024, weight: 100 });
  });

  it("parses /proc/self/cgroup and mountinfo", () => {
    const self = parseProcCgroup(SELF_V1);
    assert.equal(self.get("memory"), "/process_api/f221");
    assert.equal(self.get(""), "/");
    const mounts = parseMountinfo(MOUNTINFO_V1);
    assert.deepEqual(
      mounts.map((m) => [m.type, m.mountPoint, m.controllers.join()]),
      [
        ["cgroup", "/sys/fs/cgroup/cpu", "cpu"],
        ["cgroup", "/sys/fs/cgroup/memory", "memory"],
        ["cgroup", "/sys/fs/cgroup/pids", "pids"],
        ["cgroup2", "/sys/fs/cgroup/unified", ""],
      ],
    );
  });

  it("uses v1 under our own nested groups when the unified hierarchy has no controllers", () => {
    const layout = cgroupLayout(parseMountinfo(MOUNTINFO_V1), parseProcCgroup(SELF_V1), () => []);
    assert.deepEqual(layout, {
      version: 1,
      bases: {
        memory: "/sys/fs/cgroup/memory/process_api/f221",
        pids: "/sys/fs/cgroup/pids",
        cpu: "/sys/fs/cgroup/cpu",
      },
    });
  });

  it("prefers v2 when it holds memory, pids and cpu", () => {
    const mounts = parseMountinfo("25 20 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw");
    const layout = cgroupLayout(
      mounts,
      parseProcCgroup("0::/system.slice/podflare.service"),
      (dir) =>
        dir === "/sys/fs/cgroup/system.slice/podflare.service"
          ? ["cpuset", "cpu", "io", "memory", "pids"]
          : [],
    );
    assert.deepEqual(layout, { version: 2, base: "/sys/fs/cgroup/system.slice/podflare.service" });
  });

  it("says what is missing when neither is usable", () => {
    const layout = cgroupLayout(
      parseMountinfo("31 30 0:28 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu"),
      parseProcCgroup("1:cpu:/"),
      () => [],
    );
    assert.ok("none" in layout && /memory, pids/.test(layout.none));
  });
});
