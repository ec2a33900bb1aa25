/** A podflare sandbox: a microVM with a persistent Python REPL. */
import { compareListings, DEFAULT_DIFF_PATHS, type DiffResult, listingCommand } from "./diff.js";
import { ConnectionError, PodflareError } from "./errors.js";
import { type ConnectionOptions, Http, type RequestBody } from "./http.js";
import {
  CREATE_OPTIONS,
  EXIT_RESULT,
  type ExecResult,
  RUN_CODE_OPTIONS,
  type RunCodeOptions,
  type SandboxCreateOptions,
  wireBody,
} from "./options.js";
import {
  type ExecEvent,
  type ForkResponse,
  type ListResponse,
  type SandboxInfo,
  sandboxPath,
} from "./wire.js";

export type UploadData =
  | Uint8Array
  | string
  | Blob
  | ReadableStream<Uint8Array>
  | AsyncIterable<Uint8Array>;

const EXIT_FLAGS = ["timed_out", "truncated", "cancelled"] as const;

export class Sandbox {
  private closed = false;

  private constructor(
    readonly id: string,
    private readonly http: Http,
    readonly info: SandboxInfo,
  ) {}

  /** Create a sandbox (a ready VM from the pool when there is one). */
  static async create(opts: SandboxCreateOptions = {}): Promise<Sandbox> {
    const http = new Http(opts);
    const info = await http.json<SandboxInfo>(
      "POST",
      "/v1/sandboxes",
      wireBody(opts, CREATE_OPTIONS),
    );
    return new Sandbox(info.id, http, info);
  }

  /** Attach to an existing sandbox by id. */
  static async connect(id: string, opts: ConnectionOptions = {}): Promise<Sandbox> {
    const http = new Http(opts);
    const info = await http.json<SandboxInfo>("GET", sandboxPath(id));
    return new Sandbox(info.id, http, info);
  }

  /** The caller's sandboxes. */
  static async list(opts: ConnectionOptions = {}): Promise<SandboxInfo[]> {
    const http = new Http(opts);
    return (await http.json<ListResponse>("GET", "/v1/sandboxes")).sandboxes;
  }

  /** Events as the code produces them; the last one is always `exit`. */
  async *runCodeStream(code: string, opts: RunCodeOptions = {}): AsyncGenerator<ExecEvent> {
    const body = wireBody({ ...opts, language: opts.language ?? "python" }, RUN_CODE_OPTIONS, {
      code,
    });
    const res = await this.http.request("POST", `${this.path}/exec`, { json: body });
    yield* this.http.ndjson<ExecEvent>(res);
  }

  async runCode(code: string, opts: RunCodeOptions = {}): Promise<ExecResult> {
    let stdout = "";
    let stderr = "";
    for await (const event of this.runCodeStream(code, opts)) {
      if (event.type !== "exit") {
        if (event.type === "stdout") stdout += event.data;
        else stderr += event.data;
      } else {
        const result: ExecResult = { stdout, stderr, [EXIT_RESULT.code]: event.code };
        if (event.error) result[EXIT_RESULT.error] = event.error;
        for (const flag of EXIT_FLAGS) if (event[flag]) result[EXIT_RESULT[flag]] = true;
        return result;
      }
    }
    throw new ConnectionError(
      "the exec stream ended without an exit event (the connection was cut)",
    );
  }

  async fork(n = 1): Promise<Sandbox[]> {
    const { children } = await this.http.json<ForkResponse>("POST", `${this.path}/fork`, { n });
    return Promise.all(
      children.map(
        async (id) =>
          new Sandbox(id, this.http, await this.http.json<SandboxInfo>("GET", sandboxPath(id))),
      ),
    );
  }

  /**
   * Files that differ between this sandbox and `other`, under `paths` (default /root
   * and /tmp): `added` are only in `other`, `removed` only here, `modified` in both.
   */
  async diff(other: Sandbox, opts: { paths?: string[] } = {}): Promise<DiffResult> {
    const command = listingCommand(opts.paths ?? DEFAULT_DIFF_PATHS);
    const [mine, theirs] = await Promise.all([this.#listing(command), other.#listing(command)]);
    return compareListings(mine, theirs);
  }

  async #listing(command: string): Promise<Record<string, string>> {
    const r = await this.runCode(command, { language: "bash" });
    if (r.exitCode !== 0)
      throw new PodflareError(
        `listing the files of ${this.id} failed (exit ${r.exitCode}): ${r.stderr.slice(0, 500)}`,
      );
    return JSON.parse(r.stdout) as Record<string, string>;
  }

  /** Afterwards this sandbox's id runs the winner's VM; the winner's id is gone. */
  async mergeInto(winner: Sandbox | string): Promise<void> {
    const winnerId = typeof winner === "string" ? winner : winner.id;
    await this.http.request("POST", sandboxPath(this.id, "merge_into", winnerId));
  }

  /** Write a file in the sandbox (atomically; parents are created). Streams are not buffered. */
  async upload(path: string, data: UploadData): Promise<void> {
    let body: RequestBody;
    if (
      typeof data === "string" ||
      data instanceof Uint8Array ||
      data instanceof Blob ||
      data instanceof ReadableStream
    ) {
      body = data as RequestBody;
    } else {
      const iterator = data[Symbol.asyncIterator]();
      body = new ReadableStream<Uint8Array>({
        async pull(controller) {
          const { value, done } = await iterator.next();
          if (done) controller.close();
          else controller.enqueue(value);
        },
        async cancel() {
          await iterator.return?.();
        },
      });
    }
    await this.http.request("PUT", `${this.path}/files`, { body, query: { path } });
  }

  async download(path: string): Promise<Uint8Array> {
    const res = await this.http.request("GET", `${this.path}/files`, { query: { path } });
    return new Uint8Array(await this.http.reading(() => res.arrayBuffer()));
  }

  /** The file as a stream, for files too large to hold in memory. */
  async downloadStream(path: string): Promise<ReadableStream<Uint8Array>> {
    const res = await this.http.request("GET", `${this.path}/files`, { query: { path } });
    if (!res.body) throw new ConnectionError("the daemon sent no body");
    return res.body;
  }

  /** The sandbox as the daemon sees it now (`info` is as it was at create or connect). */
  async getInfo(): Promise<SandboxInfo> {
    return this.http.json<SandboxInfo>("GET", this.path);
  }

  /** Destroy the sandbox. Idempotent. */
  async close(): Promise<void> {
    if (this.closed) return;
    await this.http.request("DELETE", this.path);
    this.closed = true;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  private get path(): string {
    return sandboxPath(this.id);
  }
}
