/**
 * Framing of the guest-agent protocol (spec/guest-protocol.md). The only place that
 * builds or parses agent frames. Input is hostile: lengths are bounded, a corrupt stream
 * is resynchronised at the next magic, and the buffer never exceeds one maximal frame.
 * Guest twin: protocol.py (the agent's framing).
 */
export const MAGIC = Buffer.from([0x50, 0x46, 0x01, 0x00]);
export const PREAMBLE_BYTES = 12;
export const MAX_HEADER_BYTES = 64 * 1024;
export const MAX_PAYLOAD_BYTES = 1024 * 1024;
export const PROTOCOL_VERSION = 1;

export interface FrameHeader {
  type: string;
  id?: number | null;
  [key: string]: unknown;
}

export interface Frame {
  header: FrameHeader;
  payload: Buffer;
}

const EMPTY = Buffer.alloc(0);

export function encodeFrame(header: FrameHeader, payload: Buffer = EMPTY): Buffer {
  const json = Buffer.from(JSON.stringify(header), "utf8");
  if (json.length > MAX_HEADER_BYTES)
    throw new RangeError(`frame header of ${json.length} bytes exceeds ${MAX_HEADER_BYTES}`);
  if (payload.length > MAX_PAYLOAD_BYTES)
    throw new RangeError(`frame payload of ${payload.length} bytes exceeds ${MAX_PAYLOAD_BYTES}`);
  const preamble = Buffer.allocUnsafe(PREAMBLE_BYTES);
  MAGIC.copy(preamble, 0);
  preamble.writeUInt32BE(json.length, 4);
  preamble.writeUInt32BE(payload.length, 8);
  return Buffer.concat([preamble, json, payload]);
}

export type DecodeProblem =
  | { kind: "resync"; skipped: number; reason: string }
  | { kind: "bad_header"; reason: string };

/**
 * Incremental decoder. `push` returns the complete frames in the chunk; problems (skipped
 * garbage, undecodable headers) are reported through `onProblem` and never throw.
 *
 * Linear in the bytes pushed, however they are chunked: once a frame's preamble is known,
 * its buffer is allocated once and each chunk is copied into it (no re-concatenation of
 * what is already held). Between frames it holds at most a partial preamble.
 */
export class FrameDecoder {
  /** Bytes not yet part of a frame in progress: fewer than a preamble between pushes. */
  private buf: Buffer = EMPTY;
  /** The frame being filled (preamble, header, payload), once its preamble was valid. */
  private frame: Buffer | null = null;
  private filled = 0;

  constructor(private readonly onProblem: (p: DecodeProblem) => void = () => {}) {}

  /** Bytes currently held: never more than one maximal frame. */
  get buffered(): number {
    return this.frame ? this.filled : this.buf.length;
  }

  reset(): void {
    this.buf = EMPTY;
    this.frame = null;
    this.filled = 0;
  }

  push(chunk: Buffer): Frame[] {
    const frames: Frame[] = [];
    if (this.frame) {
      const n = Math.min(chunk.length, this.frame.length - this.filled);
      chunk.copy(this.frame, this.filled, 0, n);
      this.filled += n;
      if (this.filled < this.frame.length) return frames;
      const whole = this.frame;
      this.frame = null;
      this.filled = 0;
      this.emit(whole, frames, false);
      chunk = chunk.subarray(n);
    }
    // Here `buf` is at most a partial preamble: joining it to the chunk is cheap.
    this.buf = this.buf.length === 0 ? chunk : Buffer.concat([this.buf, chunk]);
    for (;;) {
      if (this.buf.length < MAGIC.length) break;
      if (!this.buf.subarray(0, MAGIC.length).equals(MAGIC)) {
        this.skipToMagic(1, "bad magic");
        continue;
      }
      if (this.buf.length < PREAMBLE_BYTES) break;
      const headerLen = this.buf.readUInt32BE(4);
      const payloadLen = this.buf.readUInt32BE(8);
      if (headerLen < 2 || headerLen > MAX_HEADER_BYTES || payloadLen > MAX_PAYLOAD_BYTES) {
        this.skipToMagic(
          1,
          `frame lengths out of bounds (header ${headerLen}, payload ${payloadLen})`,
        );
        continue;
      }
      const total = PREAMBLE_BYTES + headerLen + payloadLen;
      if (this.buf.length < total) {
        // Incomplete: copy what there is into the frame's own buffer and fill it later.
        this.frame = Buffer.allocUnsafe(total);
        this.filled = this.buf.copy(this.frame, 0);
        this.buf = EMPTY;
        break;
      }
      const whole = this.buf.subarray(0, total);
      this.buf = this.buf.subarray(total);
      this.emit(whole, frames, true);
    }
    // A partial preamble (under 12 bytes): copied, so no large chunk is kept alive by it.
    if (this.buf.length > 0) this.buf = Buffer.from(this.buf);
    return frames;
  }

  /** Decode one complete frame; `shared`: it lies in a caller's chunk (copy the payload). */
  private emit(whole: Buffer, frames: Frame[], shared: boolean): void {
    const headerLen = whole.readUInt32BE(4);
    const headerBytes = whole.subarray(PREAMBLE_BYTES, PREAMBLE_BYTES + headerLen);
    const rest = whole.subarray(PREAMBLE_BYTES + headerLen);
    const header = parseHeader(headerBytes);
    if (typeof header === "string") this.onProblem({ kind: "bad_header", reason: header });
    else frames.push({ header, payload: shared ? Buffer.from(rest) : rest });
  }

  private skipToMagic(from: number, reason: string): void {
    const next = this.buf.indexOf(MAGIC, from);
    // Keep a possible partial magic at the end of the buffer.
    const keepFrom = next >= 0 ? next : Math.max(from, this.buf.length - (MAGIC.length - 1));
    this.onProblem({ kind: "resync", skipped: keepFrom, reason });
    this.buf = this.buf.subarray(keepFrom);
  }
}

function parseHeader(bytes: Buffer): FrameHeader | string {
  let value: unknown;
  try {
    value = JSON.parse(bytes.toString("utf8"));
  } catch {
    return "header is not valid JSON";
  }
  if (typeof value !== "object" || value === null || Array.isArray(value))
    return "header is not a JSON object";
  const header = value as Record<string, unknown>;
  if (typeof header.type !== "string" || header.type.length === 0 || header.type.length > 64) {
    return "header has no valid type";
  }
  if (header.id !== undefined && header.id !== null && !isValidId(header.id))
    return "header has an invalid id";
  return header as FrameHeader;
}

function isValidId(id: unknown): id is number {
  return typeof id === "number" && Number.isSafeInteger(id) && id >= 1;
}
