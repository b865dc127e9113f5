//! JSON Schemas of everything amibake prints for programs: the manifests, the progress
//! events of `--output json`, and each command's JSON answer. Made from the very types that
//! are serialized, so a schema cannot say other than what is printed; `schemas/` in the
//! repository holds them as files (a test keeps the two equal, and validates real output
//! against them).

use schemars::{JsonSchema, Schema};
use serde_json::{json, Value};

use crate::artifact::{BakeManifest, BaseManifest};
use crate::commands::{cache, gc, history, promote, prune};
use crate::engine::Event;

/// Every schema, by the name `amibake schema NAME` takes, and what it describes.
pub const SCHEMAS: [(&str, &str); 11] = [
    (
        "bake-manifest",
        "what `amibake bake` prints on stdout with --output json, and writes with --manifest",
    ),
    (
        "base-manifest",
        "what `amibake base` prints on stdout with --output json, and writes with --manifest",
    ),
    (
        "events",
        "one line of progress on stderr with --output json (base, bake, gc)",
    ),
    (
        "validate",
        "one line of `amibake validate --output json` per template",
    ),
    ("history", "`amibake history --output json`"),
    ("promote", "`amibake promote --output json`"),
    ("rollback", "`amibake rollback --output json`"),
    ("prune", "`amibake prune --output json`"),
    ("gc", "`amibake gc --output json`"),
    ("cache-ls", "`amibake cache ls --output json`"),
    ("cache-prune", "`amibake cache prune --output json`"),
];

/// The schema called `name` (see `SCHEMAS`).
pub fn schema(name: &str) -> Option<Value> {
    let generated = match name {
        "bake-manifest" => of::<BakeManifest>(),
        "base-manifest" => of::<BaseManifest>(),
        "events" => events(),
        "validate" => of::<crate::validate::Checked>(),
        "history" => of::<history::History>(),
        "promote" | "rollback" => of::<promote::Moved>(),
        "prune" => of::<prune::Pruned>(),
        "gc" => of::<gc::Collected>(),
        "cache-ls" => of::<cache::Listing>(),
        "cache-prune" => of::<cache::Pruned>(),
        _ => return None,
    };
    let (_, about) = SCHEMAS.iter().find(|(n, _)| *n == name)?;
    let mut schema = generated.to_value();
    let root = schema.as_object_mut()?;
    root.insert("title".into(), json!(format!("amibake {name}")));
    root.insert("description".into(), json!(about));
    closed(&mut schema);
    Some(schema)
}

fn of<T: JsonSchema>() -> Schema {
    schemars::generate::SchemaSettings::draft2020_12()
        .into_generator()
        .into_root_schema_for::<T>()
}

/// The event's own fields and the `time` (RFC 3339, UTC) the JSON renderer stamps on it.
fn events() -> Schema {
    let mut schema = of::<Event>();
    let time = json!({
        "description": "When the event happened: RFC 3339, UTC.",
        "type": "string",
        "format": "date-time"
    });
    if let Some(variants) = schema.get_mut("oneOf").and_then(Value::as_array_mut) {
        for variant in variants {
            if let Some(properties) = variant.get_mut("properties").and_then(Value::as_object_mut) {
                properties.insert("time".into(), time.clone());
            }
            if let Some(required) = variant.get_mut("required").and_then(Value::as_array_mut) {
                required.push(json!("time"));
            }
        }
    }
    schema
}

/// Every object with named properties takes no others: a field added to the output without
/// its schema fails the check rather than passing unseen.
fn closed(value: &mut Value) {
    match value {
        Value::Object(map) => {
            if map.contains_key("properties") && !map.contains_key("additionalProperties") {
                map.insert("additionalProperties".into(), json!(false));
            }
            map.values_mut().for_each(closed);
        }
        Value::Array(items) => items.iter_mut().for_each(closed),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_named_schema_exists_and_is_closed() {
        for (name, _) in SCHEMAS {
            let schema = schema(name).unwrap_or_else(|| panic!("{name}"));
            assert_eq!(schema["title"], format!("amibake {name}"));
            assert!(
                schema
                    .to_string()
                    .contains("\"additionalProperties\":false"),
                "{name}"
            );
        }
        assert!(schema("nothing").is_none());
    }

    #[test]
    fn every_event_carries_its_time() {
        let schema = schema("events").unwrap();
        let variants = schema["oneOf"].as_array().unwrap();
        assert!(variants.len() >= 10);
        for variant in variants {
            assert!(variant["properties"]["time"].is_object(), "{variant}");
            assert!(variant["required"]
                .as_array()
                .unwrap()
                .contains(&json!("time")));
        }
    }
}
