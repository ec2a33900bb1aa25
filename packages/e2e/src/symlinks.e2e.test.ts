/**
 * Root never follows a link a VM's uid could plant (issue 10, item 4). The daemon runs as
 * root and each QEMU under its own uid; a compromised QEMU can do whatever its uid may on
 * the host's files. Here that uid itself (a process switched to it with setpriv, as QEMU
 * is) tries to plant links to a canary file where root writes: the console log while it
 * rotates, and during a fork the state file, the clone overlay, the save socket and the
 * socket root hands to the parent. The canary must stay untouched, and the operations
 * succeed or fail cleanly. Links put in a VM's directory before it is removed are not
 * followed, and the daemon refuses to start over a planted or foreign directory.
 */
import assert from "node:assert/strict";
import { type ChildProcess, spawn } from "node:child_process";
import {
  chmod,
  chown,
  lchown,
  lstat,
  mkdir,
  mkdtemp,
  readFile,
  rm,
  stat,
  symlink,
  writeFile,
} from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { silentLogger, startDaemon } from "@podflare/daemon";
import { ConnectionError, PodflareError, Sandbox } from "podflare";
import { eventually, listDir, startTestDaemon, type TestDaemon, testConfig } from "./harness.js";

const root = process.geteuid?.() === 0;

/** A root-owned file (and directory) that a followed link would change. */
async function makeCanary(): Promise<{ dir: string; file: string; check(): Promise<void> }> {
  const dir = await mkdtemp(join(tmpdir(), "podflare-canary-"));
  await chmod(dir, 0o755);
  const file = join(dir, "canary");
  await writeFile(file, "canary\n");
  await chmod(file, 0o644);
  await mkdir(join(dir, "keep"));
  await writeFile(join(dir, "keep", "inner"), "inner\n");
  return {
    dir,
    file,
    check: async () => {
      const st = await stat(file);
      assert.equal(await readFile(file, "utf8"), "canary\n", "the canary's content is unchanged");
      assert.equal(st.mode & 0o7777, 0o644, "the canary's mode is unchanged");
      assert.equal(st.uid, 0, "the canary still belongs to root");
      assert.equal(st.gid, 0);
      assert.equal(await readFile(join(dir, "keep", "inner"), "utf8"), "inner\n");
    },
  };
}

/** A process that runs `script` (Python), ready once it printed "ready"; stop() returns its JSON. */
async function attacker(
  argv: string[],
  script: string,
  args: string[],
): Promise<{ stop(): Promise<Record<string, unknown>>; kill(): void }> {
  const [cmd, ...rest] = argv as [string, ...string[]];
  const child: ChildProcess = spawn(cmd, [...rest, "-c", script, ...args], {
    stdio: ["ignore", "pipe", "pipe"],
  });
  let out = "";
  let err = "";
  child.stdout?.setEncoding("utf8").on("data", (c: string) => {
    out += c;
  });
  child.stderr?.setEncoding("utf8").on("data", (c: string) => {
    err += c;
  });
  const exited = new Promise<number | null>((r) => child.once("exit", (code) => r(code)));
  await eventually("the attacker to start", async () => {
    if (child.exitCode !== null) throw new Error(`the attacker exited: ${err}`);
    return out.startsWith("ready\n");
  });
  return {
    kill: () => {
      // SIGTERM: the fork watcher then kills the attacker it runs as a VM uid.
      if (child.exitCode === null && child.signalCode === null) child.kill("SIGTERM");
    },
    stop: async () => {
      child.kill("SIGTERM");
      const code = await exited;
      assert.equal(code, 0, `the attacker failed: ${err}`);
      return JSON.parse(out.slice("ready\n".length)) as Record<string, unknown>;
    },
  };
}

/** Plants links to argv[2] in directory argv[1] in a tight loop, as the uid it runs under. */
const PLANT_IN_VM_DIR = `
import errno, json, os, signal, sys
d, canary = sys.argv[1], sys.argv[2]
stop = False
def end(*_):
    global stop
    stop = True
signal.signal(signal.SIGTERM, end)
stats = {"uid": os.getuid(), "attempts": 0, "planted": [], "errors": {}}
print("ready", flush=True)
while not stop:
    for name in ("console.log", "console.log.1", "planted"):
        stats["attempts"] += 1
        try:
            os.symlink(canary, os.path.join(d, name))
            stats["planted"].append(name)
        except OSError as e:
            code = errno.errorcode.get(e.errno, str(e.errno))
            stats["errors"][code] = stats["errors"].get(code, 0) + 1
print(json.dumps(stats), flush=True)
`;

/**
 * Watches the forks directory as root; in each fork's directory, as the uid the daemon
 * gave part of it to (a receiver's, when forks had one), else as the forking VM's uid
 * (argv[5]: what a compromised parent QEMU runs as during its fork), plants links to the canary where root writes, swaps
 * the receiver's socket for a link, and leaves links to the canary's directory for the
 * removal, until the fork's directory is gone.
 */
const ATTACK_FORKS = `
import errno, json, os, signal, sys, time
forks, canary, canary_dir, swap = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "swap"
vm_uid = int(sys.argv[5])
stop = False
def end(*_):
    global stop
    stop = True
current = [None]
def end_all(*_):
    end()
    if current[0]:
        os.kill(current[0], signal.SIGTERM)  # it stops and reports
signal.signal(signal.SIGTERM, end_all)
print("ready", flush=True)
def attack(fdir):
    res = {"uid": os.getuid(), "planted": [], "swapped": 0, "errors": {}}
    rcv = os.path.join(fdir, "rcv")
    def note(e):
        code = errno.errorcode.get(e.errno, str(e.errno))
        res["errors"][code] = res["errors"].get(code, 0) + 1
    deadline = time.time() + 600
    while os.path.lexists(fdir) and time.time() < deadline and not stop:
        for name in ("state", "clone.qcow2", "save.sock", "mem", "receiver.qcow2", "console.log", "qemu.pid", "planted"):
            try:
                os.symlink(canary, os.path.join(fdir, name))
                res["planted"].append(name)
            except OSError as e:
                note(e)
        sock = os.path.join(rcv, "transfer.sock")
        try:
            st = os.lstat(sock)
            if swap and (st.st_mode & 0o170000) == 0o140000:
                os.unlink(sock)
                os.symlink(canary, sock)
                res["swapped"] += 1
        except OSError as e:
            note(e)
        for name, target in (("evil-dir", canary_dir), ("evil-file", canary)):
            try:
                os.symlink(target, os.path.join(rcv, name))
            except OSError as e:
                note(e)
    return res
seen, results = set(), []
while not stop:
    time.sleep(0.001)
    for e in os.listdir(forks) if os.path.isdir(forks) else []:
        if e in seen:
            continue
        fdir = os.path.join(forks, e)
        uid = vm_uid if os.path.isdir(fdir) else None
        for cand in (os.path.join(fdir, "rcv"), fdir):
            try:
                st = os.lstat(cand)
            except OSError:
                continue
            if st.st_uid != 0:
                uid = st.st_uid
                break
        if uid is None:
            continue
        seen.add(e)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, end)
            os.close(r)
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            os.write(w, json.dumps(attack(fdir)).encode())
            os._exit(0)
        current[0] = pid
        os.close(w)
        data = b""
        while True:
            chunk = os.read(r, 65536)
            if not chunk:
                break
            data += chunk
        os.waitpid(pid, 0)
        current[0] = None
        results.append(json.loads(data or b"{}"))
print(json.dumps({"forks": results}), flush=True)
`;

/** The VM behind a sandbox: its directory and its uid (its pid file is given to that uid). */
async function vmOf(d: TestDaemon, box: Sandbox): Promise<{ dir: string; uid: number }> {
  const host = (await box.runCode("import socket; print(socket.gethostname())")).stdout.trim();
  const dir = join(d.daemon.engine.vmsDir, host.replaceAll("-", "_"));
  const uid = (await stat(join(dir, "qemu.pid"))).uid;
  return { dir, uid };
}

describe("no root-followed links", { skip: !root && "needs root (per-VM uids)" }, () => {
  let d: TestDaemon;
  before(async () => {
    // A small console log bound, so guest output rotates it many times.
    d = await startTestDaemon({ poolSize: 1, consoleLogMaxBytes: 8192 });
  });
  after(async () => {
    await d?.close();
  });

  it("the console log rotates under a VM uid planting links in its directory", async () => {
    const canary = await makeCanary();
    const box = await Sandbox.create({ host: d.url });
    const attackers: { kill(): void }[] = [];
    try {
      const vm = await vmOf(d, box);
      assert.notEqual(vm.uid, 0, "the VM runs under its own uid");
      const plant = await attacker(
        [
          "setpriv",
          "--reuid",
          String(vm.uid),
          "--regid",
          String(vm.uid),
          "--clear-groups",
          "--",
          "/usr/bin/python3",
        ],
        PLANT_IN_VM_DIR,
        [vm.dir, canary.file],
      );
      attackers.push(plant);
      // Guest output the daemon writes to console.log: 400 KB, a rotation every 4 KiB.
      const r = await box.runCode(
        "with open('/dev/console', 'w') as f:\n    for i in range(2000):\n        f.write(f'spew {i:06d} ' + 'x' * 180 + '\\n'); f.flush()\nprint('done')",
        { timeoutMs: 300_000 },
      );
      assert.equal(r.stdout, "done\n");
      // The last line reaches the log once the serial port drained: wait for it.
      await eventually(
        "the guest's last line in the console log",
        async () => {
          const read = (f: string) => readFile(join(vm.dir, f), "utf8").catch(() => "");
          return `${await read("console.log.1")}${await read("console.log")}`.includes(
            "spew 001999",
          );
        },
        120_000,
      );
      const stats = await plant.stop();
      console.log(`symlinks: console attacker ${JSON.stringify(stats)}`);
      assert.equal(stats.uid, vm.uid);
      await canary.check(); // first: what a followed link would have done
      const dirSt = await stat(vm.dir);
      assert.equal(dirSt.uid, 0, "the VM's directory is the daemon's");
      assert.equal(dirSt.mode & 0o022, 0);
      assert.ok((stats.attempts as number) > 1000, "the attacker kept trying");
      assert.deepEqual(stats.planted, [], "the VM's uid could plant no link in its directory");
      assert.ok(((stats.errors as Record<string, number>).EACCES ?? 0) > 0, "refused: EACCES");
      for (const f of ["console.log", "console.log.1"]) {
        const st = await lstat(join(vm.dir, f));
        assert.ok(st.isFile(), `${f} is a regular file`);
        assert.equal(st.uid, 0);
        assert.equal(st.mode & 0o777, 0o600);
        assert.ok(st.size <= 8192 / 2, `${f} stays within half the bound`);
      }
      await canary.check();
      assert.equal((await box.runCode("print(1 + 1)")).stdout, "2\n", "the sandbox still works");

      // Links someone put in the VM's directory (as if its uid could) are not followed
      // when the directory is removed.
      for (const [name, target] of [
        ["evil-dir", canary.dir],
        ["evil-file", canary.file],
        ["evil-keep", join(canary.dir, "keep")],
      ] as const) {
        await symlink(target, join(vm.dir, name));
        await lchown(join(vm.dir, name), vm.uid, vm.uid);
      }
      await mkdir(join(vm.dir, "sub"));
      await symlink(canary.dir, join(vm.dir, "sub", "evil"));
      await chown(join(vm.dir, "sub"), vm.uid, vm.uid);
      await box.close();
      await eventually("the VM's directory to be removed", async () => {
        return !(await listDir(d.daemon.engine.vmsDir)).includes(vm.dir.split("/").pop() ?? "");
      });
      await canary.check();
    } finally {
      for (const a of attackers) a.kill();
      await box.close().catch(() => {});
      await rm(canary.dir, { recursive: true, force: true });
    }
  });

  for (const mode of ["plant", "swap"] as const)
    it(`a fork under a receiver uid planting links${mode === "swap" ? " and swapping its socket" : ""} follows none`, async () => {
      const canary = await makeCanary();
      const parent = await Sandbox.create({ host: d.url });
      const children: Sandbox[] = [];
      const attackers: { kill(): void }[] = [];
      try {
        await parent.runCode("x = 'parent'");
        const forks = d.daemon.engine.forksDir;
        const watch = await attacker(["/usr/bin/python3"], ATTACK_FORKS, [
          forks,
          canary.file,
          canary.dir,
          mode,
          String((await vmOf(d, parent)).uid),
        ]);
        attackers.push(watch);
        let outcome: string;
        try {
          children.push(...(await parent.fork(1)));
          outcome = "forked";
        } catch (err) {
          assert.ok(err instanceof PodflareError, `a clean API error, not ${String(err)}`);
          assert.ok(!(err instanceof ConnectionError), "the daemon kept its connection");
          outcome = `failed cleanly: ${(err as PodflareError).code}: ${(err as Error).message.slice(0, 200)}`;
        }
        const stats = await watch.stop();
        console.log(`symlinks: fork (${mode}) ${outcome}; attacker ${JSON.stringify(stats)}`);
        if (mode === "plant")
          assert.equal(outcome, "forked", "links it cannot plant do not stop a fork");
        const results = stats.forks as { uid: number; planted: string[]; swapped: number }[];
        assert.equal(results.length, 1, "the attacker found the fork and attacked it");
        const [res] = results;
        assert.ok(res && res.uid !== 0 && res.uid >= d.config.vmUidBase, "as a VM uid");
        await canary.check();
        assert.deepEqual(res.planted, [], "no link could be planted where root writes");
        await eventually("the fork's directory to be removed", async () => {
          return (await listDir(forks)).length === 0;
        });
        for (const child of children)
          assert.equal((await child.runCode("print(x)")).stdout, "parent\n");
        assert.equal(
          (await parent.runCode("print(x)")).stdout,
          "parent\n",
          "the parent still works",
        );
      } finally {
        for (const a of attackers) a.kill();
        await Promise.all([...children, parent].map((s) => s.close().catch(() => {})));
        await rm(canary.dir, { recursive: true, force: true });
      }
    });
});

describe("daemon directories are created safely", () => {
  const cases: [string, (p: string) => Promise<void>, RegExp][] = [
    ["a symbolic link", async (p) => symlink(join(p, "..", "target"), p), /symbolic link/],
    [
      "writable by others",
      async (p) => {
        await mkdir(p);
        await chmod(p, 0o777);
      },
      /writable by group or others/,
    ],
    ...(root
      ? ([
          [
            "another uid's",
            async (p: string) => {
              await mkdir(p, { mode: 0o700 });
              await chown(p, 2_147_000_321, 2_147_000_321);
            },
            /owned by uid 2147000321/,
          ],
        ] as [string, (p: string) => Promise<void>, RegExp][])
      : []),
  ];
  for (const [what, plant, message] of cases) {
    for (const setting of ["shmDir", "templatesDir", "stateDir"] as const) {
      it(`refuses to start when the ${setting} is ${what}`, async () => {
        const scratch = await mkdtemp(join("/dev/shm", "podflare-planted-"));
        const state = await mkdtemp(join(tmpdir(), "podflare-planted-state-"));
        try {
          await mkdir(join(scratch, "target"), { mode: 0o755 });
          const planted = join(scratch, "dir");
          await plant(planted);
          const config = await testConfig({
            stateDir: setting === "stateDir" ? planted : state,
            shmDir: setting === "shmDir" ? planted : join(scratch, "shm"),
            templatesDir: setting === "templatesDir" ? planted : join(scratch, "templates"),
            poolSize: 0,
          });
          const env = {
            shmDir: "PODFLARE_SHM_DIR",
            templatesDir: "PODFLARE_TEMPLATES_DIR",
            stateDir: "PODFLARE_STATE_DIR",
          }[setting];
          await assert.rejects(
            startDaemon(config, silentLogger()),
            (err: Error) =>
              /refusing to use/.test(err.message) &&
              message.test(err.message) &&
              err.message.includes(env) &&
              err.message.includes(planted),
          );
          assert.deepEqual(await listDir(join(scratch, "target")), [], "nothing went through");
        } finally {
          await rm(scratch, { recursive: true, force: true });
          await rm(state, { recursive: true, force: true });
        }
      });
    }
  }
});
