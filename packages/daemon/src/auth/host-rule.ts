/**
 * The Host rule for a daemon with no API key: a web page the operator visits can make
 * its browser send requests to any address, and with DNS rebinding (a name of the
 * attacker's that first resolves to the attacker and then to 127.0.0.1) the browser
 * believes the answers are the attacker's own. Such requests always carry the attacker's
 * name in `Host`; a browser cannot forge that header. So with no key, only requests
 * addressed to a name nobody else controls are served: `localhost`, a loopback address,
 * and, when the operator listens beyond loopback (PODFLARE_ALLOW_UNAUTHENTICATED), any
 * IP address literal (no DNS is involved, so nothing can be rebound) and the names
 * listed in PODFLARE_ALLOWED_HOSTS.
 */
import { isIP } from "node:net";
import { isLoopback } from "./authenticator.js";

export interface HostRule {
  /** The address the API listens on (PODFLARE_BIND_HOST). */
  bindHost: string;
  /** Further names accepted in `Host` (lowercase, without a port). */
  allowedHosts: readonly string[];
}

/**
 * The name in a `Host` header (`name`, `name:port`, `[v6]` or `[v6]:port`), lowercased
 * and without brackets; null when the header is missing or malformed.
 */
export function hostName(header: string | undefined): string | null {
  if (header === undefined) return null;
  const h = header.trim().toLowerCase();
  const v6 = /^\[([0-9a-f:.]+)\](?::(\d{1,5}))?$/.exec(h);
  if (v6?.[1]) return isIP(v6[1]) === 6 ? v6[1] : null;
  const named = /^([a-z0-9.-]{1,253})(?::(\d{1,5}))?$/.exec(h);
  return named?.[1] ?? null;
}

/** `localhost`, 127.0.0.0/8 or ::1 (exactly: `127.0.0.1.evil.example` is not one). */
export function isLoopbackHost(header: string | undefined): boolean {
  const name = hostName(header);
  if (name === null) return false;
  if (name === "localhost" || name === "::1") return true;
  return isIP(name) === 4 && isLoopback(name);
}

/** Whether a request with this `Host` may be served while no API key exists. */
export function hostAllowed(header: string | undefined, rule: HostRule): boolean {
  if (isLoopbackHost(header)) return true;
  const name = hostName(header);
  if (name === null) return false;
  if (rule.allowedHosts.includes(name)) return true;
  return !isLoopback(rule.bindHost) && isIP(name) !== 0;
}

/**
 * Every authority a request names: each `Host` header (a request may repeat it) and, for
 * an absolute-form target (`GET http://name/...`, which HTTP says wins over `Host`), its
 * authority.
 */
export function requestHosts(rawHeaders: readonly string[], target: string): string[] {
  const hosts: string[] = [];
  for (let i = 0; i + 1 < rawHeaders.length; i += 2) {
    if (rawHeaders[i]?.toLowerCase() === "host") hosts.push(rawHeaders[i + 1] ?? "");
  }
  if (!target.startsWith("/") && target !== "*") {
    const authority = /^[a-z][a-z0-9+.-]*:\/\/([^/?#]*)/i.exec(target)?.[1];
    hosts.push(authority?.replace(/^.*@/, "") ?? "");
  }
  return hosts;
}
