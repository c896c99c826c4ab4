//! The README's settings table must list every setting `presence serve` has.
use clap::{CommandFactory, Parser};

#[derive(Parser)]
struct Serve {
    #[command(flatten)]
    settings: presence::settings::Settings,
}

#[test]
fn every_setting_is_documented_in_the_readme() {
    let readme = include_str!("../README.md");
    let rows: Vec<&str> = readme.lines().filter(|l| l.starts_with("| `")).collect();
    let mut missing = Vec::new();
    for arg in Serve::command().get_arguments() {
        let Some(env) = arg.get_env() else { continue };
        let env = env.to_string_lossy();
        let flag = format!("`--{}`", arg.get_long().unwrap_or_default());
        if !rows
            .iter()
            .any(|r| r.contains(&format!("`{env}`")) && r.contains(&flag))
        {
            missing.push(format!("{env} ({flag})"));
        }
    }
    assert!(
        missing.is_empty(),
        "settings missing from the README's settings table: {missing:?}"
    );
}
