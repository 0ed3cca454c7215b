/**
 * Fields of the sidebar's settings in JupyterLab's settings editor that its default form renders badly: the
 * auto-approved tools (an array of enum strings) show there as a bare multi-select list without its title.
 * Rendered here as a titled group of checkboxes, one per notebook tool (the form adds the description below).
 */

import React from 'react';

interface ChecklistProps {
  formData?: unknown;
  onChange(value: string[]): void;
  schema: { title?: string; description?: string; items?: { enum?: unknown[] } };
  disabled?: boolean;
  readonly?: boolean;
}

export function ToolChecklist({ formData, onChange, schema, disabled, readonly }: ChecklistProps): JSX.Element {
  const chosen = Array.isArray(formData) ? formData.filter((v): v is string => typeof v === 'string') : [];
  const options = (schema.items?.enum ?? []).filter((v): v is string => typeof v === 'string');
  const toggle = (name: string, on: boolean) =>
    onChange(on ? [...chosen.filter(v => v !== name), name] : chosen.filter(v => v !== name));
  return (
    <fieldset className="glm-SettingsChecklist">
      <legend className="glm-SettingsChecklist-title">{schema.title ?? 'Auto-approved tools'}</legend>
      {options.map(name => (
        <label key={name} className="glm-SettingsChecklist-option">
          <input
            type="checkbox"
            checked={chosen.includes(name)}
            disabled={disabled || readonly}
            onChange={e => toggle(name, e.target.checked)}
          />
          <code>{name}</code>
        </label>
      ))}
    </fieldset>
  );
}
