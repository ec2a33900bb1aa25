/**
 * HTTP/1.1 written by hand on a node:net socket: fetch and undici normalise the request
 * target (dot segments, doubled slashes, escapes), so attacks on the spelling of a URL,
 * on headers and on timing need the request line written as is.
 */
import { connect, type Socket } from "node:net";

export interface RawReply {
  /** 0 when the server closed without answering. */
  status: number;
  headers: Record<string, string>;
  body: string;
  /** Everything the server sent. */
  raw: string;
}

export function portOf(url: string): number {
  return Number(new URL(url).port);
}

/** Send `request` as is on a fresh connection; resolve with what came back once it closes. */
export function rawRequest(port: number, request: string, timeoutMs = 60_000): Promise<RawReply> {
  return new Promise((resolve, reject) => {
    const socket = connect(port, "127.0.0.1", () => socket.write(request));
    let raw = "";
    socket.setEncoding("latin1");
    socket.on("data", (chunk: string) => {
      raw += chunk;
    });
    const timer = setTimeout(() => {
      socket.destroy();
      reject(
        new Error(`no answer within ${timeoutMs} ms to ${JSON.stringify(request.slice(0, 80))}`),
      );
    }, timeoutMs);
    socket.on("error", () => {}); // a reset after the answer is still an answer
    socket.on("close", () => {
      clearTimeout(timer);
      resolve(parseReply(raw));
    });
  });
}

export function parseReply(raw: string): RawReply {
  const end = raw.indexOf("\r\n\r\n");
  const head = end < 0 ? raw : raw.slice(0, end);
  const [statusLine = "", ...lines] = head.split("\r\n");
  const status = Number(/^HTTP\/1\.[01] (\d{3})/.exec(statusLine)?.[1] ?? 0);
  const headers: Record<string, string> = {};
  for (const line of lines) {
    const i = line.indexOf(":");
    if (i > 0) headers[line.slice(0, i).trim().toLowerCase()] = line.slice(i + 1).trim();
  }
  return { status, headers, body: end < 0 ? "" : raw.slice(end + 4), raw };
}

/** A request with `connection: close`, so the reply ends with the connection. */
export function requestText(
  method: string,
  target: string,
  headers: Record<string, string | null>,
  body = "",
): string {
  const all: Record<string, string | null> = { host: "localhost", ...headers };
  if (body) {
    all["content-type"] ??= "application/json";
    all["content-length"] = String(Buffer.byteLength(body));
  }
  all.connection = "close";
  const lines = Object.entries(all)
    .filter((e): e is [string, string] => e[1] !== null)
    .map(([k, v]) => `${k}: ${v}\r\n`)
    .join("");
  return `${method} ${target} HTTP/1.1\r\n${lines}\r\n${body}`;
}

/** A connection that stays open; `closed` resolves (with what arrived) when the server ends it. */
export function openSocket(port: number): Promise<{
  socket: Socket;
  received: () => string;
  closed: Promise<string>;
}> {
  return new Promise((resolve, reject) => {
    let raw = "";
    const socket = connect(port, "127.0.0.1");
    socket.setEncoding("latin1");
    socket.on("data", (chunk: string) => {
      raw += chunk;
    });
    socket.on("error", () => {});
    const closed = new Promise<string>((r) => socket.once("close", () => r(raw)));
    socket.once("connect", () => resolve({ socket, received: () => raw, closed }));
    socket.once("error", reject);
  });
}
