/**
 * Who is calling. Keys come from the key store (`podflare keys create`) and from
 * PODFLARE_API_KEYS; once either holds a key, every caller must present one. The given
 * key is hashed and compared with every active digest in constant time, with no early
 * exit, so neither timing nor the store's index reveals which digest came close.
 */
import { timingSafeEqual } from "node:crypto";
import { hashKey, type KeyQuota, type KeyStore } from "./keys.js";

export interface Tenant {
  /** The key's id: sandboxes are owned by it. */
  id: string;
  quota: KeyQuota;
}

/** No key is required: every caller is this one tenant (owner null in the store). */
export const ANONYMOUS = null;

export type AuthResult =
  | { ok: true; tenant: Tenant | typeof ANONYMOUS }
  | { ok: false; reason: string };

const NO_QUOTA: KeyQuota = { maxSandboxes: null, maxMemMib: null };

export class Authenticator {
  private readonly envKeys: { id: string; hash: Buffer }[];

  constructor(
    private readonly store: KeyStore | null,
    envKeys: readonly string[],
  ) {
    this.envKeys = envKeys.map((key, i) => ({ id: `env_${i + 1}`, hash: hashKey(key) }));
  }

  /** Whether callers must present a key. */
  required(): boolean {
    return this.envKeys.length > 0 || (this.store?.any() ?? false);
  }

  authenticate(authorization: string | undefined): AuthResult {
    // One query per request while keys exist; `required()` only when none is active.
    const candidates = [
      ...this.envKeys.map((k) => ({ ...k, quota: NO_QUOTA })),
      ...(this.store?.active() ?? []),
    ];
    if (candidates.length === 0 && !this.required()) return { ok: true, tenant: ANONYMOUS };
    const match = /^Bearer\s+(\S{1,512})$/i.exec(authorization ?? "");
    if (!match?.[1]) {
      return { ok: false, reason: "missing API key: send Authorization: Bearer <key>" };
    }
    const given = hashKey(match[1]);
    let found: Tenant | null = null;
    for (const k of candidates) {
      const equal = timingSafeEqual(k.hash, given);
      if (equal && !found) found = { id: k.id, quota: k.quota };
    }
    if (!found) {
      return {
        ok: false,
        reason:
          "wrong or revoked API key: check PODFLARE_API_KEY (keys are listed with: podflare keys list)",
      };
    }
    return { ok: true, tenant: found };
  }
}

/** Loopback addresses: listening there exposes the API to this host only. */
export function isLoopback(host: string): boolean {
  const h = host
    .trim()
    .toLowerCase()
    .replace(/^\[|\]$/g, "");
  return h === "localhost" || h === "::1" || /^127(\.\d{1,3}){3}$/.test(h);
}
