/** Validation of guest file paths given by API callers (the guest re-checks them). */
import { posix } from "node:path";
import { BadRequestError } from "./errors.js";
import { MAX_PATH_BYTES } from "./limits.js";

export function validateGuestPath(path: unknown): string {
  if (typeof path !== "string" || path.length === 0) {
    throw new BadRequestError("the query parameter `path` is required, e.g. ?path=/root/data.csv");
  }
  if (path.includes("\0")) throw new BadRequestError("path must not contain a NUL byte");
  if (!path.startsWith("/"))
    throw new BadRequestError(
      `path must be absolute (start with /), got ${JSON.stringify(path).slice(0, 200)}`,
    );
  if (Buffer.byteLength(path) > MAX_PATH_BYTES)
    throw new BadRequestError(`path is longer than ${MAX_PATH_BYTES} bytes`);
  if (path.endsWith("/"))
    throw new BadRequestError("path names a directory (ends with /); give a file path");
  const normal = posix.normalize(path);
  if (normal === "/") throw new BadRequestError("path names the root directory; give a file path");
  return normal;
}
