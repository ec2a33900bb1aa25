/**
 * Bounds on what a request may ask, defined once: the HTTP schemas (api/schemas.ts) and
 * the service's own checks (sandboxes/normalize.ts) both read them. Bounds that depend on
 * the host's configuration (the most vCPUs, memory, lifetime) are in config, not here.
 */

/** Children one fork call may make. */
export const MAX_FORK_CHILDREN = 32;
/** The longest an exec call may ask to run (24 h). */
export const MAX_EXEC_TIMEOUT_MS = 24 * 3600_000;
/** The smallest VM memory a sandbox may ask for. */
export const MIN_MEM_SIZE_MIB = 128;
/** Schema ceilings on a create's shape (the host's own, lower, limits are checked after). */
export const SCHEMA_MAX_VCPU_COUNT = 64;
export const SCHEMA_MAX_MEM_SIZE_MIB = 1024 * 1024;
/** The code of one exec call. */
export const MAX_CODE_BYTES = 1024 * 1024;
/** A sandbox id as a route parameter. */
export const MAX_ID_LENGTH = 128;
/** A template name in a create. */
export const MAX_TEMPLATE_NAME_LENGTH = 64;
/** A create's metadata: entries, key and value lengths. */
export const MAX_METADATA_ENTRIES = 64;
export const MAX_METADATA_KEY_LENGTH = 128;
export const MAX_METADATA_VALUE_LENGTH = 1024;
/** A guest file path in bytes (sandboxes/paths.ts), and the query string's looser cap. */
export const MAX_PATH_BYTES = 4096;
export const MAX_PATH_QUERY_LENGTH = 8192;
