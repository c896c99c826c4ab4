//! The optional TOML settings file (`--config` or `PRESENCE_CONFIG`). Its values become the
//! defaults of `serve`'s arguments, so clap's own layering does the rest: defaults < file <
//! environment < flags, with no environment written and no argument scanned by hand.
use std::path::Path;

use super::SettingsError;

/// The file's settings as (argument id, value), each checked by its argument's own parser.
/// Fails naming the file and the key.
pub fn read(path: &Path, serve: &clap::Command) -> Result<Vec<(String, String)>, SettingsError> {
    let file = path.display();
    let text = std::fs::read_to_string(path)
        .map_err(|e| SettingsError::new("PRESENCE_CONFIG", format!("cannot read {file}: {e}")))?;
    let table: toml::Table = text.parse().map_err(|e| {
        SettingsError::new("PRESENCE_CONFIG", format!("{file} is not valid TOML: {e}"))
    })?;
    let mut values = Vec::new();
    for (key, value) in table {
        let arg = serve
            .get_arguments()
            .find(|a| a.get_id().as_str() == key && key != "config")
            .ok_or_else(|| {
                SettingsError::new(
                    "PRESENCE_CONFIG",
                    format!("{file}: unknown setting {key:?}"),
                )
            })?;
        let value = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            other => {
                return Err(SettingsError::new(
                    "PRESENCE_CONFIG",
                    format!("{file}: {key} must be a string, integer or boolean, got {other}"),
                ));
            }
        };
        // The value goes through the argument's own parser, alone, before it becomes a default.
        let long = arg.get_long().unwrap_or(key.as_str());
        let alone = clap::Command::new("file")
            .no_binary_name(true)
            .arg(arg.clone().env(None::<&str>).required(false));
        alone
            .try_get_matches_from([format!("--{long}={value}")])
            .map_err(|e| {
                let reason = e.render().to_string();
                let reason = reason
                    .trim_start_matches("error: ")
                    .lines()
                    .next()
                    .unwrap_or("");
                SettingsError::new("PRESENCE_CONFIG", format!("{file}: {key}: {reason}"))
            })?;
        values.push((key, value));
    }
    Ok(values)
}

/// `serve` with the file's values as its arguments' defaults.
pub fn apply(mut serve: clap::Command, values: &[(String, String)]) -> clap::Command {
    for (key, value) in values {
        let value = value.clone();
        serve = serve.mut_arg(key.as_str(), move |a| a.default_value(value));
    }
    serve
}
