//! The contact graph the bench creates and reasons about: a ring where user `i` is linked to
//! `i+1 ..= i+K/2` (mod N), so that, the links being symmetric, every user has exactly K
//! contacts: K/2 on each side. Online users are `1..=C`, so most of an online user's contacts are
//! online too and a status change is delivered to about K receivers.
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;
use tonic::Request;

use presence::pb::{self, contacts_client::ContactsClient};

use crate::client::{Auth, Pool};

/// Pairs per AddContacts call: half the server's default PRESENCE_MAX_PAIRS (10,000).
const PAIRS_PER_CALL: u64 = 5000;
/// AddContacts calls in flight at once.
const CONCURRENT_CALLS: usize = 4;

#[derive(Debug, Clone, Copy)]
pub struct Ring {
    /// Users `1..=n`.
    pub n: u64,
    /// Links on each side of a user.
    half: u64,
}

impl Ring {
    pub fn new(users: u64, contacts: u64) -> anyhow::Result<Ring> {
        let half = contacts / 2;
        if users < 2 {
            bail!("--users must be at least 2");
        }
        if 2 * half >= users {
            bail!("--contacts {contacts} needs more than {contacts} other users (--users {users})");
        }
        Ok(Ring { n: users, half })
    }

    /// Contacts per user: K rounded down to even.
    pub fn degree(&self) -> u64 {
        2 * self.half
    }

    fn wrap(&self, u: u64, offset: i64) -> u64 {
        let n = self.n as i64;
        ((u as i64 - 1 + offset).rem_euclid(n) + 1) as u64
    }

    /// The contacts of `u`, ascending.
    pub fn contacts(&self, u: u64) -> Vec<u64> {
        let h = self.half as i64;
        let mut c: Vec<u64> = (1..=h)
            .flat_map(|d| [self.wrap(u, -d), self.wrap(u, d)])
            .collect();
        c.sort_unstable();
        c
    }

    /// Symmetric pairs in the graph (each listed once).
    pub fn pair_count(&self) -> u64 {
        self.n * self.half
    }

    /// The `p`-th pair: user `p / half + 1` with the `p % half + 1`-th user after it.
    pub fn pair(&self, p: u64) -> (u64, u64) {
        let u = p / self.half + 1;
        (u, self.wrap(u, (p % self.half + 1) as i64))
    }
}

/// Whether to create the graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetupMode {
    /// Create it unless the server already has it (checked on three users).
    Auto,
    Always,
    Never,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct SetupFigures {
    /// False when the graph was already there (or `--no-setup`).
    pub created: bool,
    pub pairs: u64,
    pub calls: u64,
    pub seconds: f64,
}

/// Creates the ring through Contacts/AddContacts as the bench service, in batches, a few calls
/// at a time (AddContacts is idempotent, so a rerun is harmless, only slow).
pub async fn ensure(
    ring: Ring,
    pool: &Pool,
    auth: &Auth,
    mode: SetupMode,
) -> anyhow::Result<SetupFigures> {
    if ring.half == 0 || mode == SetupMode::Never {
        return Ok(SetupFigures::default());
    }
    if mode == SetupMode::Auto && already_there(ring, pool, auth).await? {
        eprintln!(
            "setup: the server already has the {}-user ring with {} contacts each; skipping (--setup forces it)",
            ring.n,
            ring.degree()
        );
        return Ok(SetupFigures::default());
    }
    let started = Instant::now();
    let total = ring.pair_count();
    let calls = total.div_ceil(PAIRS_PER_CALL);
    eprintln!(
        "setup: adding {total} contact pairs ({} users x {} contacts) in {calls} AddContacts calls",
        ring.n,
        ring.degree()
    );
    let done = std::sync::atomic::AtomicU64::new(0);
    futures::stream::iter(0..calls)
        .map(|c| {
            let (pool, auth, done) = (pool, auth, &done);
            async move {
                let end = ((c + 1) * PAIRS_PER_CALL).min(total);
                let pairs = (c * PAIRS_PER_CALL..end)
                    .map(|p| {
                        let (user_id, contact_id) = ring.pair(p);
                        pb::ContactPair {
                            user_id,
                            contact_id,
                        }
                    })
                    .collect();
                let mut req = Request::new(pb::AddContactsRequest { pairs });
                auth.as_service(&mut req);
                req.set_timeout(Duration::from_secs(300));
                ContactsClient::new(pool.for_user(c + 1))
                    .add_contacts(req)
                    .await
                    .with_context(|| format!("AddContacts call {} of {calls}", c + 1))?;
                let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                if n % 50 == 0 || n == calls {
                    eprintln!(
                        "setup: {n}/{calls} calls, {:.0} s",
                        started.elapsed().as_secs_f64()
                    );
                }
                anyhow::Ok(())
            }
        })
        .buffer_unordered(CONCURRENT_CALLS)
        .try_collect::<()>()
        .await?;
    Ok(SetupFigures {
        created: true,
        pairs: total,
        calls,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Whether users 1, N/2 and N already have exactly their ring contacts.
async fn already_there(ring: Ring, pool: &Pool, auth: &Auth) -> anyhow::Result<bool> {
    for u in [1, ring.n / 2 + 1, ring.n] {
        if list_contacts(pool, auth, u).await? != ring.contacts(u) {
            return Ok(false);
        }
    }
    Ok(true)
}

async fn list_contacts(pool: &Pool, auth: &Auth, user: u64) -> anyhow::Result<Vec<u64>> {
    let mut out = Vec::new();
    let mut page_token = String::new();
    loop {
        let mut req = Request::new(pb::ListContactsRequest {
            user_id: user,
            page_size: 1000,
            page_token,
        });
        auth.as_service(&mut req);
        let page = ContactsClient::new(pool.for_user(user))
            .list_contacts(req)
            .await
            .with_context(|| format!("ListContacts of user {user}"))?
            .into_inner();
        out.extend(page.contact_ids);
        if page.next_page_token.is_empty() {
            return Ok(out);
        }
        page_token = page.next_page_token;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_user_has_exactly_k_contacts_and_links_are_symmetric() {
        let ring = Ring::new(20, 6).unwrap();
        let mut degree = vec![0; 21];
        for p in 0..ring.pair_count() {
            let (a, b) = ring.pair(p);
            assert_ne!(a, b, "nobody is their own contact");
            assert!(ring.contacts(a).contains(&b), "{a}-{b} is in {a}'s list");
            assert!(ring.contacts(b).contains(&a), "{a}-{b} is in {b}'s list");
            degree[a as usize] += 1;
            degree[b as usize] += 1;
        }
        assert!(degree[1..].iter().all(|&d| d == 6), "degrees: {degree:?}");
        assert_eq!(ring.contacts(1), vec![2, 3, 4, 18, 19, 20], "wraps around");
    }

    #[test]
    fn a_graph_denser_than_the_users_is_refused() {
        assert!(Ring::new(10, 10).is_err());
        assert!(Ring::new(11, 10).is_ok());
    }
}
