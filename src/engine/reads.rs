//! The engine's reads of the store, merged: while one query runs, the reads asked for meanwhile
//! wait and then go together as the next query.
//!
//! Devices connecting in a wave each need their user's contact list and their contacts' rows.
//! Read one by one, that was three statements per connect, and with SQLite each statement is a
//! round trip to the connection's worker thread: under a wave of connects, two fifths of the
//! server's CPU went to switching threads. Merged, a wave costs a few statements per batch of
//! connects, and a lone read still runs at once.
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::domain::UserId;
use crate::store::{PresenceRow, Result, Store};

/// Most users one merged query reads; more wait for the next one.
const MAX_USERS_PER_QUERY: usize = 2_000;

use super::contact_list::ContactList;
use super::registry::ContactSet;

/// Merged reads of presence rows and contact lists.
pub(super) struct Reads {
    store: Arc<dyn Store>,
    rows: Merger<HashMap<UserId, PresenceRow>>,
    contacts: Merger<HashMap<UserId, ContactSet>>,
}

impl Reads {
    /// Starts the two merging tasks; they stop when the `Reads` is dropped.
    pub(super) fn start(store: Arc<dyn Store>) -> Reads {
        Reads {
            rows: Merger::start(store.clone(), read_rows),
            contacts: Merger::start(store.clone(), read_contacts),
            store,
        }
    }

    /// The stored rows of `users` (and maybe of others read in the same query), by user.
    pub(super) async fn presence(
        &self,
        users: &[UserId],
    ) -> Result<Arc<HashMap<UserId, PresenceRow>>> {
        if let Some(rows) = self.rows.read(users).await {
            return Ok(rows);
        }
        // The merged query failed (or the task is gone): read alone, for this caller's own
        // error, or its rows if the failure was someone else's.
        Ok(Arc::new(
            read_rows(self.store.clone(), users.to_vec()).await?,
        ))
    }

    /// `user`'s contacts.
    pub(super) async fn contacts(&self, user: UserId) -> Result<ContactSet> {
        let all = match self.contacts.read(&[user]).await {
            Some(all) => all,
            // As for rows: read alone after a failed merged query.
            None => Arc::new(read_contacts(self.store.clone(), vec![user]).await?),
        };
        Ok(all.get(&user).cloned().unwrap_or_default())
    }
}

async fn read_rows(
    store: Arc<dyn Store>,
    users: Vec<UserId>,
) -> Result<HashMap<UserId, PresenceRow>> {
    let rows = store.load_presence(&users).await?;
    Ok(rows.into_iter().map(|r| (r.user_id, r)).collect())
}

/// Every listed user's contact set (empty for a user without contacts).
async fn read_contacts(
    store: Arc<dyn Store>,
    users: Vec<UserId>,
) -> Result<HashMap<UserId, ContactSet>> {
    let pairs = store.contacts_of_many(&users).await?;
    let mut lists: HashMap<UserId, Vec<UserId>> = users.iter().map(|&u| (u, Vec::new())).collect();
    for (user, contact) in pairs {
        lists.entry(user).or_default().push(contact);
    }
    Ok(lists
        .into_iter()
        .map(|(u, ids)| (u, Arc::new(ids.into_iter().collect::<ContactList>())))
        .collect())
}

/// One read waiting for a query: its users and where the answer goes (None: the query failed).
type Ask<V> = (Vec<UserId>, oneshot::Sender<Option<Arc<V>>>);

/// Runs one query at a time for everything asked since the previous one started.
struct Merger<V> {
    asks: mpsc::UnboundedSender<Ask<V>>,
}

impl<V: Send + Sync + 'static> Merger<V> {
    /// Starts the task that runs `query(source, users)` for each merged batch.
    fn start<S, Fut>(source: S, query: fn(S, Vec<UserId>) -> Fut) -> Merger<V>
    where
        S: Clone + Send + 'static,
        Fut: Future<Output = Result<V>> + Send + 'static,
    {
        let (asks, mut rx) = mpsc::unbounded_channel::<Ask<V>>();
        tokio::spawn(async move {
            let mut carried: Option<Ask<V>> = None;
            loop {
                let first = match carried.take() {
                    Some(ask) => ask,
                    None => match rx.recv().await {
                        Some(ask) => ask,
                        None => return,
                    },
                };
                let mut users = first.0.clone();
                let mut waiting = vec![first.1];
                while users.len() < MAX_USERS_PER_QUERY {
                    match rx.try_recv() {
                        Ok(ask) if users.len() + ask.0.len() > MAX_USERS_PER_QUERY => {
                            carried = Some(ask);
                            break;
                        }
                        Ok((more, reply)) => {
                            users.extend(more);
                            waiting.push(reply);
                        }
                        Err(_) => break,
                    }
                }
                users.sort_unstable();
                users.dedup();
                let answer = match query(source.clone(), users).await {
                    Ok(v) => Some(Arc::new(v)),
                    Err(e) => {
                        tracing::debug!(error = %e, "a merged store read failed");
                        None
                    }
                };
                for reply in waiting {
                    let _ = reply.send(answer.clone());
                }
            }
        });
        Merger { asks }
    }

    /// The answer of the query that read `users` (None when that query failed).
    async fn read(&self, users: &[UserId]) -> Option<Arc<V>> {
        let (reply, answer) = oneshot::channel();
        self.asks.send((users.to_vec(), reply)).ok()?;
        answer.await.ok().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreError;
    use std::sync::Mutex;
    use tokio::sync::Semaphore;

    /// What the test query sees: the batches it was asked, and a gate that holds the first.
    #[derive(Clone)]
    struct Probe {
        batches: Arc<Mutex<Vec<Vec<UserId>>>>,
        gate: Arc<Semaphore>,
    }

    impl Default for Probe {
        fn default() -> Self {
            Probe {
                batches: Arc::default(),
                gate: Arc::new(Semaphore::new(0)),
            }
        }
    }

    fn ids(range: std::ops::RangeInclusive<u64>) -> Vec<UserId> {
        range.map(|i| UserId::parse(i).unwrap()).collect()
    }

    /// Answers each user with its own id doubled; fails when asked for user 13.
    async fn doubled(probe: Probe, users: Vec<UserId>) -> Result<HashMap<UserId, u64>> {
        probe.batches.lock().unwrap().push(users.clone());
        let _pass = probe.gate.acquire().await.expect("the gate stays open");
        if users.iter().any(|u| u.get() == 13) {
            return Err(StoreError::Corrupt {
                user: 13,
                what: "unlucky".into(),
            });
        }
        Ok(users.iter().map(|u| (*u, u.get() * 2)).collect())
    }

    #[tokio::test]
    async fn reads_asked_while_a_query_runs_go_together_in_the_next_one() {
        let probe = Probe::default();
        let merger = Arc::new(Merger::start(probe.clone(), doubled));
        // The first read's query waits at the gate; 20 more reads arrive meanwhile.
        let first = tokio::spawn({
            let m = merger.clone();
            async move { m.read(&ids(1..=2)).await }
        });
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while probe.batches.lock().unwrap().is_empty() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the first query starts");
        // Each later read sends its ask in its first poll, right after counting itself (the
        // test runtime has one thread: a poll is never interrupted).
        let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let later: Vec<_> = (0..20u64)
            .map(|i| {
                let m = merger.clone();
                let asked = asked.clone();
                tokio::spawn(async move {
                    asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    (i, m.read(&ids(100 + i..=100 + i)).await)
                })
            })
            .collect();
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while asked.load(std::sync::atomic::Ordering::SeqCst) < 20 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("every later read is asked");
        probe.gate.add_permits(100);
        let first = first.await.unwrap().expect("the first read is answered");
        assert_eq!(first.get(&UserId::parse(2).unwrap()), Some(&4));
        for task in later {
            let (i, answer) = task.await.unwrap();
            let answer = answer.expect("each later read is answered");
            let me = UserId::parse(100 + i).unwrap();
            assert_eq!(
                answer.get(&me),
                Some(&((100 + i) * 2)),
                "read {i} gets its user"
            );
        }
        let batches = probe.batches.lock().unwrap().clone();
        assert_eq!(
            batches,
            vec![ids(1..=2), ids(100..=119)],
            "one query for the first read, one for the 20 that waited"
        );
    }

    #[tokio::test]
    async fn a_failed_query_answers_none_to_each_of_its_readers() {
        let probe = Probe::default();
        probe.gate.add_permits(100);
        let merger = Merger::start(probe.clone(), doubled);
        assert!(
            merger.read(&ids(12..=13)).await.is_none(),
            "a failed query answers None, so the reader re-reads alone for its own error"
        );
        assert_eq!(
            merger
                .read(&ids(14..=14))
                .await
                .and_then(|a| a.get(&UserId::parse(14).unwrap()).copied()),
            Some(28),
            "the merger goes on after a failure"
        );
    }
}
