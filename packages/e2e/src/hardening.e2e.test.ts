/**
 * Hardening of QEMU, checked on real VMs: seccomp, a uid of its own per VM (as root),
 * per-VM cgroup limits, private directories; forks and flattened chains still work;
 * nothing (cgroup, uid claim) is left behind. Prints QEMU's memory beyond guest RAM.
 */
import assert from "node:assert/strict";
import { readdir, readFile, stat } from "node:fs/promises";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { Sandbox } from "podflare";
import { eventually, listDir, startTestDaemon, type TestDaemon } from "./harness.js";

const root = process.getuid?.() === 0;
let current: TestDaemon | undefined;
const D = (): TestDaemon => current as TestDaemon;

async function status(pid: number): Promise<Record<string, string>> {
  const out: Record<string, string> = {};
  for (const line of (await readFile(`/proc/${pid}/status`, "utf8")).split("\n")) {
    const i = line.indexOf(":");
    if (i > 0) out[line.slice(0, i)] = line.slice(i + 1).trim();
  }
  return out;
}

/** controller -> cgroup path of a process (v1), "" -> path (v2). */
async function cgroupsOf(pid: number): Promise<Map<string, string>> {
  const m = new Map<string, string>();
  for (const line of (await readFile(`/proc/${pid}/cgroup`, "utf8")).split("\n")) {
    const parts = /^\d+:([^:]*):(.*)$/.exec(line);
    if (!parts) continue;
    for (const c of (parts[1] ?? "").split(",")) m.set(c, parts[2] ?? "");
  }
  return m;
}

/** QEMU's resident memory outside the guest RAM mapping, and its proportional share. */
async function overheadKib(pid: number, memSizeMib: number): Promise<{ rss: number; pss: number }> {
  const smaps = await readFile(`/proc/${pid}/smaps`, "utf8");
  let inGuest = false;
  let rss = 0;
  let pss = 0;
  for (const line of smaps.split("\n")) {
    const range = /^([0-9a-f]+)-([0-9a-f]+) /.exec(line);
    if (range) {
      const size =
        (Number.parseInt(range[2] ?? "0", 16) - Number.parseInt(range[1] ?? "0", 16)) / 1024;
      inGuest = size === memSizeMib * 1024;
      continue;
    }
    if (inGuest) continue;
    const m = /^(Rss|Pss):\s+(\d+) kB/.exec(line);
    if (m?.[1] === "Rss") rss += Number(m[2]);
    if (m?.[1] === "Pss") pss += Number(m[2]);
  }
  return { rss, pss };
}

describe("hardening", () => {
  let d: TestDaemon | undefined;
  before(async () => {
    d = await startTestDaemon({ poolSize: 1, maxDiskChain: 2 });
    current = d;
  });
  after(async () => {
    await d?.close();
  });

  it("restored VMs run under seccomp, their own uid and their cgroup's limits", async () => {
    const a = await Sandbox.create({ host: D().url, vcpuCount: 2, memSizeMib: 512 });
    const b = await Sandbox.create({ host: D().url, vcpuCount: 1, memSizeMib: 256 });
    try {
      await a.runCode(
        "import hashlib\nfor i in range(20000): hashlib.sha256(str(i).encode()).hexdigest()",
      );
      const pids = [a, b].map((s) => D().daemon.service.vmPid(s.id) as number);
      const uids = new Set<string>();
      for (const pid of pids) {
        const st = await status(pid);
        assert.equal(st.Seccomp, "2", "QEMU runs under its seccomp filter");
        assert.equal(st.NoNewPrivs, "1");
        const uid = (st.Uid ?? "").split(/\s+/);
        if (root) {
          assert.notEqual(uid[0], "0", "QEMU is not root");
          assert.equal(new Set(uid).size, 1, "real, effective, saved and fs uids are the VM's");
          assert.equal(st.Groups, "", "no supplementary groups");
          assert.equal((st.Gid ?? "").split(/\s+/)[0], uid[0], "gid of the same number");
        }
        uids.add(uid[0] ?? "");
      }
      if (root) assert.equal(uids.size, 2, "a uid per VM");

      const cg = await D().daemon.engine.cgroups();
      if (!cg) {
        console.log("hardening: no writable cgroups on this host; limits not checked");
      } else {
        const [pa] = pids as [number];
        const groups = await cgroupsOf(pa);
        for (const [controller, dir] of cg.version === 1
          ? ([
              ["memory", cg.parents[0]],
              ["pids", cg.parents[1]],
              ["cpu", cg.parents[2]],
            ] as const)
          : ([["", cg.parents[0]]] as const)) {
          const path = groups.get(controller) ?? "";
          assert.match(path, new RegExp(`/podflare/${D().daemon.engine.cgroupScope}/[a-z0-9_]+$`));
          const name = path.split("/").pop() as string;
          const dir2 = join(dir as string, name);
          const procs = (await readFile(join(dir2, "cgroup.procs"), "utf8")).split("\n");
          assert.ok(procs.includes(String(pa)), `QEMU is in its ${controller || "v2"} group`);
          const threads = (await readFile(join(dir2, "tasks"), "utf8").catch(() => ""))
            .split("\n")
            .filter(Boolean);
          if (cg.version === 1) assert.ok(threads.length > 2, "every QEMU thread moved with it");
          const read = async (f: string) => (await readFile(join(dir2, f), "utf8")).trim();
          const mib = 1024 * 1024;
          if (controller === "memory")
            assert.equal(
              Number(await read("memory.limit_in_bytes")),
              (2 * 512 + D().config.vmMemOverheadMib) * mib,
            );
          if (controller === "pids") {
            assert.equal(await read("pids.max"), String(96 + 2));
            assert.ok(Number(await read("pids.current")) <= 98);
          }
          if (controller === "cpu") {
            assert.equal(await read("cpu.cfs_quota_us"), "200000");
            assert.equal(await read("cpu.cfs_period_us"), "100000");
            assert.equal(await read("cpu.shares"), "2048");
          }
          if (controller === "") {
            assert.equal(
              await read("memory.max"),
              String((2 * 512 + D().config.vmMemOverheadMib) * mib),
            );
            assert.equal(await read("cpu.max"), "200000 100000");
            assert.equal(await read("pids.max"), "98");
          }
        }
      }

      // Private directories.
      const mode = async (p: string) => (await stat(p)).mode & 0o777;
      const traverse = root ? 0o711 : 0o700;
      assert.equal(await mode(D().config.stateDir), traverse);
      assert.equal(await mode(D().daemon.engine.vmsDir), traverse);
      // Disk layers reach QEMU as fds: their directory is root's alone (private-layers e2e).
      assert.equal(await mode(D().daemon.engine.layers.dir), 0o700);
      for (const vmDir of await listDir(D().daemon.engine.vmsDir)) {
        const st = await stat(join(D().daemon.engine.vmsDir, vmDir));
        assert.equal(st.mode & 0o777, traverse, `${vmDir} is traversable at most`);
        // The daemon's: its VM may reach its files but create, rename or remove none
        // (packages/e2e/src/symlinks.e2e.test.ts plants links there).
        assert.equal(st.uid, process.geteuid?.(), `${vmDir} belongs to the daemon`);
      }
      for (const layer of await listDir(D().daemon.engine.layers.dir)) {
        const m = await mode(join(D().daemon.engine.layers.dir, layer));
        assert.equal(m, 0o600, `${layer} is root's alone`);
      }

      // What QEMU costs beyond guest RAM, under TCG, after some work.
      for (const [s, pid, mem] of [
        [a, pids[0], 512],
        [b, pids[1], 256],
      ] as const) {
        const o = await overheadKib(pid as number, mem);
        const threads = (await listDir(`/proc/${pid}/task`)).length;
        console.log(
          `hardening: QEMU ${s === a ? "2 vCPU/512 MiB" : "1 vCPU/256 MiB"}: RSS beyond guest RAM ${Math.round(o.rss / 1024)} MiB, PSS ${Math.round(o.pss / 1024)} MiB, ${threads} threads; cgroup allows ${D().config.vmMemOverheadMib} MiB`,
        );
      }
    } finally {
      await Promise.all([a.close(), b.close()]);
    }
  });

  it("a forked child and a flattened chain work with per-VM uids", async () => {
    const parent = await Sandbox.create({ host: D().url });
    const boxes = [parent];
    try {
      await parent.runCode("x = 1\nopen('/root/p.txt', 'w').write('p')");
      const [c1] = await parent.fork(1);
      assert.ok(c1);
      boxes.push(c1);
      const [c2] = await c1.fork(1);
      assert.ok(c2);
      boxes.push(c2);
      await c2.runCode("x += 1\nopen('/root/c2.txt', 'w').write('c2')");
      await eventually("the chains to be flattened", async () =>
        boxes.every((s) => (D().daemon.service.diskChainLength(s.id) ?? 0) <= 2),
      );
      const [c3] = await c2.fork(1);
      assert.ok(c3);
      boxes.push(c3);
      assert.equal(
        (await c3.runCode("print(x, open('/root/p.txt').read(), open('/root/c2.txt').read())"))
          .stdout,
        "2 p c2\n",
      );
      if (root) {
        const uids = new Set(
          await Promise.all(
            boxes.map(async (s) => (await status(D().daemon.service.vmPid(s.id) as number)).Uid),
          ),
        );
        assert.equal(uids.size, boxes.length, "parent and children each have their own uid");
      }
      // Frozen layers are the daemon's and read-only for VMs.
      for (const layer of await listDir(D().daemon.engine.layers.dir)) {
        const st = await stat(join(D().daemon.engine.layers.dir, layer));
        if (st.uid === 0)
          assert.equal(st.mode & 0o222 & ~0o200, 0, `${layer}: only root may write`);
      }
    } finally {
      for (const s of boxes) await s.close();
    }
    await D().daemon.service.settled();
  });

  it("leaves no cgroup and no uid behind", async () => {
    const daemon = d as TestDaemon;
    const cg = await daemon.daemon.engine.cgroups();
    const uids = daemon.daemon.engine.uids;
    d = undefined;
    await daemon.close();
    if (cg) {
      for (const p of cg.parents) {
        const left = (await readdir(p, { withFileTypes: true }).catch(() => []))
          .filter((e) => e.isDirectory())
          .map((e) => e.name);
        assert.deepEqual(left, [], `no VM cgroup left under ${p}`);
      }
    }
    assert.equal(uids?.inUse ?? 0, 0, "every VM uid released");
  });
});
