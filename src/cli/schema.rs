//! `amibake schema NAME`: the JSON Schema of one thing amibake prints for programs.

use clap::Args;

use amibake::exit;
use amibake::schemas::{schema, SCHEMAS};

#[derive(Debug, Args)]
pub struct SchemaArgs {
    /// Which output; without one, the list of them.
    #[arg(value_parser = clap::builder::PossibleValuesParser::new(SCHEMAS.map(|(name, _)| name)))]
    pub name: Option<String>,
}

pub fn run(args: SchemaArgs) -> i32 {
    match args.name.as_deref().and_then(schema) {
        Some(schema) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&schema).expect("a schema serializes")
            );
        }
        None => {
            for (name, about) in SCHEMAS {
                println!("{name:<14} {about}");
            }
        }
    }
    exit::OK
}
