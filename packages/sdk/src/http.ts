/** The SDK's HTTP plumbing: where the daemon is, the key, and JSON / NDJSON requests. */
import { ConnectionError, errorFromResponse } from "./errors.js";

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
    const host = opts.host ?? process.env.PODFLARE_HOST ?? DEFAULT_HOST;
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
      throw new ConnectionError(
        `cannot reach the podflare daemon at ${this.host} (${(err as Error).cause ?? (err as Error).message}); is \`podflare serve\` running? Set PODFLARE_HOST if it listens elsewhere`,
      );
    }
    if (!res.ok) throw errorFromResponse(res.status, await res.text());
    return res;
  }

  async json<T>(method: string, path: string, json?: unknown): Promise<T> {
    const res = await this.request(method, path, json === undefined ? {} : { json });
    return (await res.json()) as T;
  }

  /** Parse an NDJSON response body into objects, line by line, as they arrive. */
  async *ndjson<T>(res: Response): AsyncGenerator<T> {
    if (!res.body) return;
    const decoder = new TextDecoder();
    let buffer = "";
    for await (const chunk of res.body as unknown as AsyncIterable<Uint8Array>) {
      buffer += decoder.decode(chunk, { stream: true });
      let newline = buffer.indexOf("\n");
      while (newline >= 0) {
        const line = buffer.slice(0, newline).trim();
        buffer = buffer.slice(newline + 1);
        if (line) yield JSON.parse(line) as T;
        newline = buffer.indexOf("\n");
      }
    }
    if (buffer.trim()) yield JSON.parse(buffer) as T;
  }
}
