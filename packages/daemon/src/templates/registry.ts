/**
 * The templates this daemon offers, by name. Adding one is a spec file beside default.ts
 * plus one line here.
 */
import { BadRequestError } from "../sandboxes/errors.js";
import { defaultTemplate } from "./default.js";
import type { TemplateSpec } from "./spec.js";

export const TEMPLATES: readonly TemplateSpec[] = [defaultTemplate];

/** The template of a create that names none, and of the warm pool. */
export const DEFAULT_TEMPLATE = defaultTemplate.name;

export function templateNames(): string[] {
  return TEMPLATES.map((t) => t.name);
}

/** The 400 for a template name not among `known`: it lists the known ones. */
export function unknownTemplateError(name: string, known: readonly string[]): BadRequestError {
  return new BadRequestError(
    `unknown template ${JSON.stringify(name).slice(0, 80)}; available: ${known.join(", ")}`,
  );
}

/** The spec named `name`; a 400 that lists the known ones otherwise. */
export function templateSpec(name: string): TemplateSpec {
  const spec = TEMPLATES.find((t) => t.name === name);
  if (!spec) throw unknownTemplateError(name, templateNames());
  return spec;
}
