//! `presence contacts import`: bulk-loads contact pairs straight into the store.
use std::io::BufRead;
use std::process::ExitCode;

use crate::domain::UserId;
use crate::server::open_store_within;
use crate::settings::SecretUrl;
use crate::store::MAX_ROWS_PER_STATEMENT;

pub async fn import(file: &str, database_url: &SecretUrl) -> anyhow::Result<ExitCode> {
    let store = open_store_within(database_url, Some(super::ONE_SHOT_PATIENCE)).await?;
    let reader: Box<dyn BufRead> = if file == "-" {
        Box::new(std::io::BufReader::new(std::io::stdin()))
    } else {
        Box::new(std::io::BufReader::new(
            std::fs::File::open(file).map_err(|e| anyhow::anyhow!("cannot open {file}: {e}"))?,
        ))
    };
    let started = std::time::Instant::now();
    let mut batch = Vec::with_capacity(MAX_ROWS_PER_STATEMENT);
    let mut total = 0u64;
    for (n, line) in reader.lines().enumerate() {
        let line = line?;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        match parse_pair(line) {
            Ok(pair) => batch.push(pair),
            Err(_) if n == 0 => continue, // a header line
            Err(e) => anyhow::bail!("{file}: line {}: {e}", n + 1),
        }
        if batch.len() == MAX_ROWS_PER_STATEMENT {
            store.add_contacts(&batch).await?;
            total += batch.len() as u64;
            batch.clear();
        }
    }
    if !batch.is_empty() {
        store.add_contacts(&batch).await?;
        total += batch.len() as u64;
    }
    eprintln!(
        "imported {total} contact pairs in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

fn parse_pair(line: &str) -> Result<(UserId, UserId), String> {
    let (a, b) = line
        .split_once(',')
        .ok_or_else(|| format!("expected `user_id,contact_id`, got {line:?}"))?;
    let a = UserId::parse_str(a).map_err(|e| e.to_string())?;
    let b = UserId::parse_str(b).map_err(|e| e.to_string())?;
    if a == b {
        return Err(format!("a user cannot be their own contact ({a})"));
    }
    Ok((a, b))
}
