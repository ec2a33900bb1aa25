/** For the SDK's unit tests: the repository, spec/openapi.yaml, and the Python SDK. */
import { execFile } from "node:child_process";
import { readFile } from "node:fs/promises";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { parse } from "yaml";

export const repoRoot = fileURLToPath(new URL("../../../", import.meta.url));

type Schema = {
  $ref?: string;
  properties?: Record<string, Schema>;
  required?: string[];
  oneOf?: Schema[];
  content?: Record<string, { schema: Schema }>;
};
export type Fields = Record<string, "required" | "optional">;

export interface Spec {
  /** A schema's fields by a path in the spec, e.g. "components.schemas.Sandbox". */
  fields(path: string): Fields;
}

export async function loadSpec(): Promise<Spec> {
  const doc = parse(await readFile(`${repoRoot}spec/openapi.yaml`, "utf8")) as object;
  const at = (path: string[]): Schema => {
    let node: unknown = doc;
    for (const key of path) node = (node as Record<string, unknown> | undefined)?.[key];
    if (node === undefined) throw new Error(`spec/openapi.yaml has no ${path.join(".")}`);
    const ref = (node as Schema).$ref;
    return ref ? at(ref.replace(/^#\//, "").split("/")) : (node as Schema);
  };
  return {
    fields(path) {
      const schema = at(path.split("."));
      const out: Fields = {};
      for (const name of Object.keys(schema.properties ?? {}))
        out[name] = schema.required?.includes(name) ? "required" : "optional";
      return out;
    },
  };
}

/** Run Python code with the repository's python/ on its path; parse what it prints as JSON. */
export async function pythonJson<T>(code: string): Promise<T> {
  const { stdout } = await promisify(execFile)("python3", ["-c", code], {
    env: { ...process.env, PYTHONPATH: `${repoRoot}python` },
  });
  return JSON.parse(stdout) as T;
}

export function snakeCase(name: string): string {
  return name.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`);
}
