#!/usr/bin/env node
/**
 * The `podflare` command. Client verbs go through the SDK over HTTP, exactly as a user's
 * program would; only `serve` and `image build` touch daemon internals.
 */
import { readFile } from "node:fs/promises";
import { InvalidArgumentError as CliArgError, Command, Option } from "commander";
import { PodflareError, Sandbox } from "podflare";

const program = new Command("podflare")
  .description("Self-hosted microVM sandboxes for AI agents")
  .addHelpText(
    "after",
    "\nClient verbs talk to PODFLARE_HOST (default http://127.0.0.1:7070) with PODFLARE_API_KEY.",
  );

function positiveInt(value: string): number {
  const n = Number(value);
  if (!Number.isSafeInteger(n) || n < 1)
    throw new CliArgError(`${value} is not a positive integer`);
  return n;
}

program
  .command("serve")
  .description("run the daemon (HTTP API on 127.0.0.1:7070 by default)")
  .option("--host <address>", "address to listen on (PODFLARE_BIND_HOST)")
  .option("--port <port>", "port to listen on (PODFLARE_PORT)", positiveInt)
  .option(
    "--allow-unauthenticated",
    "listen beyond loopback with no API key (PODFLARE_ALLOW_UNAUTHENTICATED=1); refused otherwise",
  )
  .action(async (opts: { host?: string; port?: number; allowUnauthenticated?: boolean }) => {
    const { createLogger, loadConfig, startDaemon } = await import("@podflare/daemon");
    const overrides: Record<string, unknown> = {};
    if (opts.host) overrides.host = opts.host;
    if (opts.port) overrides.port = opts.port;
    if (opts.allowUnauthenticated) overrides.allowUnauthenticated = true;
    const config = loadConfig(overrides);
    const log = createLogger(config.logLevel);
    const daemon = await startDaemon(config, log);
    let stopping = false;
    const stop = (signal: string) => {
      if (stopping) return;
      stopping = true;
      log.info({ signal }, "stopping: destroying sandboxes");
      void daemon.close().then(() => process.exit(0));
    };
    process.on("SIGINT", () => stop("SIGINT"));
    process.on("SIGTERM", () => stop("SIGTERM"));
  });

const image = program.command("image").description("the guest image");
image
  .command("build")
  .description(
    "build the guest image (kernel, initramfs, root file system); cached by content hash",
  )
  .action(async () => {
    const { ensureImage, loadConfig } = await import("@podflare/daemon");
    const config = loadConfig();
    const started = Date.now();
    const img = await ensureImage({ imagesDir: config.imagesDir, guestDir: config.guestDir }, (m) =>
      process.stderr.write(`${m}\n`),
    );
    process.stderr.write(`image ${img.key} at ${img.dir} (${Date.now() - started} ms)\n`);
  });

program
  .command("create")
  .description("create a sandbox and print its id")
  .option("--template <name>", "template")
  .option("--vcpus <n>", "vCPUs", positiveInt)
  .option("--memory <mib>", "memory in MiB", positiveInt)
  .option("--timeout <ms>", "lifetime in milliseconds", positiveInt)
  .option("--json", "print the whole sandbox record as JSON")
  .action(
    async (opts: {
      template?: string;
      vcpus?: number;
      memory?: number;
      timeout?: number;
      json?: boolean;
    }) => {
      const sbx = await Sandbox.create({
        ...(opts.template ? { template: opts.template } : {}),
        ...(opts.vcpus ? { vcpuCount: opts.vcpus } : {}),
        ...(opts.memory ? { memSizeMib: opts.memory } : {}),
        ...(opts.timeout ? { timeoutMs: opts.timeout } : {}),
      });
      process.stdout.write(opts.json ? `${JSON.stringify(sbx.info, null, 2)}\n` : `${sbx.id}\n`);
    },
  );

program
  .command("ls")
  .description("list sandboxes")
  .option("--json", "print JSON")
  .action(async (opts: { json?: boolean }) => {
    const list = await Sandbox.list();
    if (opts.json) {
      process.stdout.write(`${JSON.stringify(list, null, 2)}\n`);
      return;
    }
    const rows = list.map((s) => [
      s.id,
      s.state,
      s.template,
      `${s.vcpu_count}`,
      `${s.mem_size_mib}`,
      s.created_at,
      s.expires_at,
    ]);
    const header = ["ID", "STATE", "TEMPLATE", "VCPUS", "MEM_MIB", "CREATED", "EXPIRES"];
    const widths = header.map((h, i) =>
      Math.max(h.length, ...rows.map((r) => (r[i] ?? "").length)),
    );
    for (const r of [header, ...rows])
      process.stdout.write(
        `${r
          .map((c, i) => c.padEnd(widths[i] ?? 0))
          .join("  ")
          .trimEnd()}\n`,
      );
  });

program
  .command("exec")
  .description("run code in a sandbox, streaming its output; exits with the code's exit code")
  .argument("<id>", "sandbox id")
  .argument("[code...]", "the code (or use --file, or - to read standard input)")
  .addOption(
    new Option("-l, --language <language>", "language")
      .choices(["python", "bash"])
      .default("python"),
  )
  .option("--bash", "same as --language bash")
  .option("-f, --file <path>", "read the code from a file")
  .option("--timeout <ms>", "interrupt the code after this many milliseconds", positiveInt)
  .action(
    async (
      id: string,
      codeParts: string[],
      opts: { language: "python" | "bash"; bash?: boolean; file?: string; timeout?: number },
    ) => {
      let code = codeParts.join(" ");
      if (opts.file) code = await readFile(opts.file, "utf8");
      else if (code === "-") code = await readStdin();
      if (!code)
        throw new CliArgError(
          "no code given: pass it as an argument, with --file, or - for standard input",
        );
      const sbx = await Sandbox.connect(id);
      let exitCode = 1;
      for await (const event of sbx.runCodeStream(code, {
        language: opts.bash ? "bash" : opts.language,
        ...(opts.timeout ? { timeoutMs: opts.timeout } : {}),
      })) {
        if (event.type === "stdout") process.stdout.write(event.data);
        else if (event.type === "stderr") process.stderr.write(event.data);
        else if (event.type === "exit") {
          exitCode = event.code;
          if (event.timed_out)
            process.stderr.write(`podflare: timed out after ${opts.timeout} ms\n`);
        }
      }
      process.exitCode = exitCode;
    },
  );

program
  .command("upload")
  .description("copy a local file into a sandbox")
  .argument("<id>", "sandbox id")
  .argument("<local>", "local file")
  .argument("<remote>", "absolute path in the sandbox")
  .action(async (id: string, local: string, remote: string) => {
    const { createReadStream } = await import("node:fs");
    const sbx = await Sandbox.connect(id);
    await sbx.upload(remote, createReadStream(local) as AsyncIterable<Uint8Array>);
  });

program
  .command("download")
  .description("copy a file out of a sandbox (to standard output, or to a local path)")
  .argument("<id>", "sandbox id")
  .argument("<remote>", "absolute path in the sandbox")
  .argument("[local]", "local file (default: standard output)")
  .action(async (id: string, remote: string, local?: string) => {
    const { createWriteStream } = await import("node:fs");
    const { Readable, Writable } = await import("node:stream");
    const { pipeline } = await import("node:stream/promises");
    const sbx = await Sandbox.connect(id);
    const body = await sbx.downloadStream(remote);
    await pipeline(
      Readable.fromWeb(body as import("node:stream/web").ReadableStream),
      local
        ? createWriteStream(local)
        : (process.stdout as unknown as InstanceType<typeof Writable>),
    );
  });

program
  .command("fork")
  .description("fork a running sandbox n ways; prints the children's ids")
  .argument("<id>", "sandbox id")
  .option("-n <n>", "number of children (1 to 32)", positiveInt, 1)
  .action(async (id: string, opts: { n: number }) => {
    const sbx = await Sandbox.connect(id);
    for (const child of await sbx.fork(opts.n)) process.stdout.write(`${child.id}\n`);
  });

program
  .command("diff")
  .description("list the files that differ between two sandboxes (added: only in <other>)")
  .argument("<id>", "sandbox id")
  .argument("<other>", "the sandbox to compare with")
  .option("-p, --path <path...>", "directories to compare (default /root /tmp)")
  .action(async (id: string, other: string, opts: { path?: string[] }) => {
    const [a, b] = await Promise.all([Sandbox.connect(id), Sandbox.connect(other)]);
    const d = await a.diff(b, opts.path ? { paths: opts.path } : {});
    for (const [mark, list] of [
      ["A", d.added],
      ["D", d.removed],
      ["M", d.modified],
    ] as const) {
      for (const path of list) process.stdout.write(`${mark} ${path}\n`);
    }
  });

program
  .command("merge")
  .description("make <id> run <winner>'s VM; <winner>'s id is gone")
  .argument("<id>", "the sandbox that stays")
  .argument("<winner>", "the sandbox whose VM it takes over")
  .action(async (id: string, winner: string) => {
    await (await Sandbox.connect(id)).mergeInto(winner);
  });

program
  .command("rm")
  .description("destroy sandboxes")
  .argument("<ids...>", "sandbox ids")
  .action(async (ids: string[]) => {
    for (const id of ids) {
      await (await Sandbox.connect(id)).close();
    }
  });

// Keys are managed on the daemon's host, in its database (PODFLARE_STATE_DIR); a running
// daemon sees a new or revoked key on its next request.
async function withKeyStore<T>(fn: (keys: import("@podflare/daemon").KeyStore) => T): Promise<T> {
  const { KeyStore, Store, loadConfig } = await import("@podflare/daemon");
  const { mkdir } = await import("node:fs/promises");
  const config = loadConfig();
  await mkdir(config.stateDir, { recursive: true, mode: 0o700 });
  const store = new Store(config.paths.database);
  try {
    return fn(new KeyStore(store.db));
  } finally {
    store.close();
  }
}

const keys = program
  .command("keys")
  .description("API keys (run on the daemon's host; each key is a tenant with its own sandboxes)");
keys
  .command("create")
  .description("create a key and print it once (only its hash is stored)")
  .requiredOption("--name <name>", "what the key is for, e.g. ci-runner")
  .option("--max-sandboxes <n>", "sandboxes this key may hold at once", positiveInt)
  .option("--max-mem-mib <mib>", "guest memory this key's sandboxes may hold at once", positiveInt)
  .option("--json", "print the key and its record as JSON")
  .action(
    async (opts: { name: string; maxSandboxes?: number; maxMemMib?: number; json?: boolean }) => {
      const { record, secret } = await withKeyStore((k) =>
        k.create(opts.name, {
          maxSandboxes: opts.maxSandboxes ?? null,
          maxMemMib: opts.maxMemMib ?? null,
        }),
      );
      if (opts.json) process.stdout.write(`${JSON.stringify({ ...record, key: secret })}\n`);
      else {
        process.stdout.write(`${secret}\n`);
        process.stderr.write(
          `created ${record.id} (${record.name}); the key above is shown only now: export PODFLARE_API_KEY=<key>\n`,
        );
      }
    },
  );
keys
  .command("list")
  .description("list keys (never the keys themselves: id, name, prefix, quotas, state)")
  .option("--json", "print JSON")
  .action(async (opts: { json?: boolean }) => {
    const list = await withKeyStore((k) => k.list());
    if (opts.json) {
      process.stdout.write(`${JSON.stringify(list)}\n`);
      return;
    }
    for (const k of list) {
      const state = k.revokedAt ? `revoked ${new Date(k.revokedAt).toISOString()}` : "active";
      const quota = `max_sandboxes=${k.maxSandboxes ?? "default"} max_mem_mib=${k.maxMemMib ?? "default"}`;
      process.stdout.write(`${k.id}\t${k.prefix}…\t${k.name}\t${state}\t${quota}\n`);
    }
  });
keys
  .command("revoke")
  .description(
    "revoke a key: requests with it fail from now on; its sandboxes keep running until they expire or are destroyed",
  )
  .argument("<id>", "the key's id (key_...), from podflare keys list")
  .action(async (id: string) => {
    const changed = await withKeyStore((k) => k.revoke(id));
    process.stderr.write(changed ? `revoked ${id}\n` : `${id} was already revoked\n`);
  });

async function readStdin(): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const chunk of process.stdin) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks).toString("utf8");
}

program.parseAsync().catch((err: unknown) => {
  if (err instanceof PodflareError || (err as Error).name === "KeyError")
    process.stderr.write(`podflare: ${(err as Error).message}\n`);
  else process.stderr.write(`podflare: ${(err as Error).stack ?? String(err)}\n`);
  process.exitCode = err instanceof PodflareError && err.status === 404 ? 4 : 1;
});
