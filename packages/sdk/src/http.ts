/** The SDK's HTTP plumbing: where the daemon is, the key, and JSON / NDJSON requests. */
import { ConnectionError, errorFromResponse, PodflareError, TimeoutError } from "./errors.js";

export type RequestBody = NonNullable<RequestInit["body"]>;

export const DEFAULT_HOST = "http://127.0.0.1:7070";

export interface ConnectionOptions {
  /** Daemon URL; else PODFLARE_HOST; else http://127.0.0.1:7070. */
  host?: string;
  /** API key; else PODFLARE_API_KEY. */
  apiKey?: string;
}

export class Http {
  readonly host: string;
  private readonly apiKey: string | undefined;

  constructor(opts: ConnectionOptions = {}) {
    // An empty host (or PODFLARE_HOST) means the default, as in the Python SDK.
    const host = opts.host || process.env.PODFLARE_HOST || DEFAULT_HOST;
    this.host = (/^https?:\/\//.test(host) ? host : `http://${host}`).replace(/\/+$/, "");
    this.apiKey = opts.apiKey ?? process.env.PODFLARE_API_KEY ?? undefined;
  }

  async request(
    method: string,
    path: string,
    init: { json?: unknown; body?: RequestBody; query?: Record<string, string> } = {},
  ): Promise<Response> {
    const url = new URL(this.host + path);
    for (const [k, v] of Object.entries(init.query ?? {})) url.searchParams.set(k, v);
    const headers: Record<string, string> = {};
    if (this.apiKey) headers.authorization = `Bearer ${this.apiKey}`;
    let body: RequestBody | undefined = init.body;
    if (init.json !== undefined) {
      headers["content-type"] = "application/json";
      body = JSON.stringify(init.json);
    } else if (body !== undefined) {
      headers["content-type"] = "application/octet-stream";
    }
    let res: Response;
    try {
      res = await fetch(url, { method, headers, body, duplex: "half" } as RequestInit);
    } catch (err) {
      const Cls = isTimeout(err) ? TimeoutError : ConnectionError;
      throw new Cls(
        `cannot reach the podflare daemon at ${this.host} (${(err as Error).cause ?? (err as Error).message}); is \`podflare serve\` running? Set PODFLARE_HOST if it listens elsewhere`,
      );
    }
    if (!res.ok) throw errorFromResponse(res.status, await this.reading(() => res.text()));
    return res;
  }

  async json<T>(method: string, path: string, json?: unknown): Promise<T> {
    const res = await this.request(method, path, json === undefined ? {} : { json });
    return (await this.reading(() => res.json())) as T;
  }

  /** Read a response body; a cut or a timeout is a ConnectionError / TimeoutError. */
  async reading<T>(read: () => Promise<T>): Promise<T> {
    try {
      return await read();
    } catch (err) {
      if (err instanceof SyntaxError) throw err;
      throw errorFromTransport(err, this.host, "while it answered");
    }
  }

  /** Parse an NDJSON response body into objects, line by line, as they arrive. */
  async *ndjson<T>(res: Response): AsyncGenerator<T> {
    if (!res.body) return;
    const decoder = new TextDecoder();
    let buffer = "";
    const chunks = (res.body as unknown as AsyncIterable<Uint8Array>)[Symbol.asyncIterator]();
    try {
      for (;;) {
        const next = await this.reading(() => chunks.next());
        if (next.done) break;
        buffer += decoder.decode(next.value, { stream: true });
        let newline = buffer.indexOf("\n");
        while (newline >= 0) {
          const line = buffer.slice(0, newline).trim();
          buffer = buffer.slice(newline + 1);
          if (line) yield JSON.parse(line) as T;
          newline = buffer.indexOf("\n");
        }
      }
    } finally {
      // A reader that stops early (runCode at the exit event) releases the connection.
      await chunks.return?.().catch(() => {});
    }
    if (buffer.trim()) yield JSON.parse(buffer) as T;
  }
}

/** undici's codes for a wait that ran out (its headers and body timeouts). */
const TIMEOUT_CODES = new Set(["UND_ERR_HEADERS_TIMEOUT", "UND_ERR_BODY_TIMEOUT"]);

/** A fetch failure (or a body read's) that is a timeout rather than a cut or a refusal. */
function isTimeout(err: unknown): boolean {
  const cause = (err as { cause?: { code?: unknown } } | null)?.cause;
  return TIMEOUT_CODES.has(String(cause?.code));
}

/** The error for a response body whose reading failed: `doing` says when. */
export function errorFromTransport(err: unknown, host: string, doing: string): PodflareError {
  if (err instanceof PodflareError) return err;
  const cause = (err as { cause?: unknown } | null)?.cause;
  const detail = String(
    (cause as Error | undefined)?.message ?? cause ?? (err as Error)?.message ?? err,
  );
  if (isTimeout(err))
    return new TimeoutError(
      `the podflare daemon at ${host} sent nothing for too long ${doing} (${detail})`,
    );
  return new ConnectionError(
    `the connection to the podflare daemon at ${host} was cut ${doing} (${detail})`,
  );
}
