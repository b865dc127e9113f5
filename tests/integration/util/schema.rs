//! The JSON Schemas in schemas/, held against what the binary really printed.

use super::repo_root;

/// Panics, naming each problem, unless `instance` is what schemas/NAME.schema.json says.
pub fn assert_valid(name: &str, instance: &serde_json::Value) {
    let path = repo_root().join(format!("schemas/{name}.schema.json"));
    let schema: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let validator = jsonschema::validator_for(&schema)
        .unwrap_or_else(|e| panic!("{}: not a schema: {e}", path.display()));
    let problems: Vec<String> = validator
        .iter_errors(instance)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        problems.is_empty(),
        "{name}: {problems:#?}\n{}",
        serde_json::to_string_pretty(instance).unwrap()
    );
}

/// Every JSON line of `text` (a run's stderr with --output json) is an event as
/// schemas/events.schema.json says; how many there were.
pub fn assert_events_valid(text: &str) -> usize {
    let events: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    for event in &events {
        assert_valid("events", event);
    }
    events.len()
}
