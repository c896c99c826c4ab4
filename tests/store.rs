//! The store suite: every case below runs against SQLite (a temporary file per test) and against
//! MySQL/MariaDB when `PRESENCE_TEST_MYSQL_URL` is set (for example
//! `mysql://root@127.0.0.1:3306/test`). Each MySQL test creates its own database through that
//! URL and drops it afterwards, so the tests run in parallel.
//!
//! Without the variable the MySQL tests are listed as ignored (see build.rs); with it, an
//! unreachable server fails them. `.ci/run` always sets it.

use std::sync::Arc;

use presence::domain::{CustomStatus, Privacy, Status, UserId, Visibility};
use presence::store::{
    self, MAX_ROWS_PER_STATEMENT, MySqlStore, PresenceRow, SqliteStore, Store, StoreError,
};
use sqlx::{Connection, Executor};

/// The node the cases write rows as.
const NODE: &str = "node-a";

fn user(id: u64) -> UserId {
    UserId::parse(id).expect("test user ids are positive")
}

fn users(ids: impl IntoIterator<Item = u64>) -> Vec<UserId> {
    ids.into_iter().map(user).collect()
}

/// A row with the given version and otherwise the defaults of a never-seen user.
fn row(id: u64, version: u64) -> PresenceRow {
    PresenceRow {
        version,
        ..PresenceRow::new(user(id))
    }
}

async fn load_one(store: &dyn Store, id: u64) -> Option<PresenceRow> {
    let mut rows = store
        .load_presence(&[user(id)])
        .await
        .expect("loading one row works");
    assert!(rows.len() <= 1, "a user has at most one row, got {rows:?}");
    rows.pop()
}

async fn load_sorted(store: &dyn Store, ids: &[UserId]) -> Vec<PresenceRow> {
    let mut rows = store.load_presence(ids).await.expect("loading rows works");
    rows.sort_by_key(|r| r.user_id);
    rows
}

// ---------------------------------------------------------------------------------------------
// The cases, written once against the trait.
// ---------------------------------------------------------------------------------------------

async fn migrating_twice_is_harmless(store: Arc<dyn Store>) {
    store
        .migrate()
        .await
        .expect("a second migration finds nothing to do");
    store
        .upsert_presence_batch(&[row(1, 1)], NODE)
        .await
        .expect("the schema still works after migrating twice");
    assert_eq!(
        load_one(&*store, 1).await,
        Some(row(1, 1)),
        "the row written after the second migration reads back"
    );
}

async fn loading_unknown_users_finds_no_rows(store: Arc<dyn Store>) {
    let rows = store
        .load_presence(&users([1, 2, 3]))
        .await
        .expect("loading unknown users is not an error");
    assert!(rows.is_empty(), "unknown users have no rows, got {rows:?}");
    let rows = store
        .load_presence(&[])
        .await
        .expect("loading nobody is not an error");
    assert!(rows.is_empty(), "loading nobody finds nobody");
}

async fn an_upserted_row_loads_back_with_every_field(store: Arc<dyn Store>) {
    let full = PresenceRow {
        user_id: user(7),
        chosen: Status::Busy,
        is_online: true,
        last_seen: Some(1_700_000_000_123),
        version: 42,
        offline_version: 17,
        epoch: 3,
        privacy: Privacy {
            online: Visibility::Everyone,
            last_seen: Visibility::Nobody,
            approximate_last_seen: false,
        },
        checkpoint_at: Some(1_700_000_060_456),
        custom: Some(std::sync::Arc::new(CustomStatus {
            text: "In a meeting — 会議中".into(),
            emoji: "📅".into(),
            expires_at: Some(1_700_000_999_000),
        })),
    };
    let bare = PresenceRow {
        user_id: user(8),
        chosen: Status::Away,
        is_online: false,
        last_seen: None,
        version: 1,
        offline_version: 0,
        epoch: 0,
        privacy: Privacy::default(),
        checkpoint_at: None,
        custom: Some(std::sync::Arc::new(CustomStatus {
            text: String::new(),
            emoji: ":coffee:".into(),
            expires_at: None,
        })),
    };
    // 2^53 + 1 does not survive a trip through a double: ids must stay integers all the way.
    let big = PresenceRow {
        chosen: Status::Offline,
        privacy: Privacy {
            online: Visibility::Nobody,
            last_seen: Visibility::Everyone,
            approximate_last_seen: true,
        },
        ..row((1 << 53) + 1, u64::from(u32::MAX) + 5)
    };
    let written = vec![full, bare, big];
    store
        .upsert_presence_batch(&written, NODE)
        .await
        .expect("upserting new rows works");
    let read = load_sorted(&*store, &users([7, 8, (1 << 53) + 1, 9])).await;
    assert_eq!(
        read, written,
        "every field of every row reads back as written"
    );
}

async fn an_upsert_with_a_lower_version_changes_nothing(store: Arc<dyn Store>) {
    let current = PresenceRow {
        chosen: Status::Busy,
        is_online: true,
        last_seen: Some(1_000),
        epoch: 2,
        ..row(1, 5)
    };
    store
        .upsert_presence_batch(std::slice::from_ref(&current), NODE)
        .await
        .expect("first upsert works");
    let stale = PresenceRow {
        chosen: Status::Away,
        is_online: false,
        last_seen: Some(5_000),
        epoch: 1,
        privacy: Privacy {
            online: Visibility::Nobody,
            last_seen: Visibility::Nobody,
            approximate_last_seen: false,
        },
        checkpoint_at: Some(6_000),
        ..row(1, 4)
    };
    store
        .upsert_presence_batch(&[stale], NODE)
        .await
        .expect("a stale upsert is not an error");
    assert_eq!(
        load_one(&*store, 1).await,
        Some(current.clone()),
        "a lower version must not change any column, not even last_seen or checkpoint"
    );
    store
        .upsert_presence_batch(std::slice::from_ref(&current), NODE)
        .await
        .expect("replaying the same row works");
    assert_eq!(
        load_one(&*store, 1).await,
        Some(current),
        "replaying the same row is idempotent"
    );
}

async fn last_seen_never_moves_backwards(store: Arc<dyn Store>) {
    let first = PresenceRow {
        last_seen: Some(2_000),
        ..row(1, 1)
    };
    store
        .upsert_presence_batch(std::slice::from_ref(&first), NODE)
        .await
        .expect("first upsert works");

    let older = PresenceRow {
        chosen: Status::Away,
        last_seen: Some(1_000),
        ..row(1, 2)
    };
    store
        .upsert_presence_batch(&[older], NODE)
        .await
        .expect("second upsert works");
    let read = load_one(&*store, 1).await.expect("the row exists");
    assert_eq!(read.version, 2, "the higher version is taken");
    assert_eq!(
        read.chosen,
        Status::Away,
        "the higher version's status is taken"
    );
    assert_eq!(
        read.last_seen,
        Some(2_000),
        "an older last_seen does not replace a newer one"
    );

    store
        .upsert_presence_batch(&[row(1, 3)], NODE)
        .await
        .expect("third upsert works");
    let read = load_one(&*store, 1).await.expect("the row exists");
    assert_eq!(
        read.last_seen,
        Some(2_000),
        "a missing last_seen does not erase a known one"
    );

    let newer = PresenceRow {
        last_seen: Some(3_000),
        ..row(1, 4)
    };
    store
        .upsert_presence_batch(&[newer], NODE)
        .await
        .expect("fourth upsert works");
    let read = load_one(&*store, 1).await.expect("the row exists");
    assert_eq!(
        read.last_seen,
        Some(3_000),
        "a newer last_seen replaces an older one"
    );
}

async fn twelve_hundred_rows_are_written_in_batches_of_at_most_five_hundred(store: Arc<dyn Store>) {
    let statuses = [Status::Online, Status::Away, Status::Busy, Status::Offline];
    let written: Vec<PresenceRow> = (1..=1200u64)
        .map(|id| PresenceRow {
            chosen: statuses[(id % 4) as usize],
            is_online: id % 3 == 0,
            last_seen: (id % 5 != 0).then(|| 1_000_000 + id as i64),
            epoch: id % 7,
            ..row(id, id * 10)
        })
        .collect();
    for batch in written.chunks(MAX_ROWS_PER_STATEMENT) {
        store
            .upsert_presence_batch(batch, NODE)
            .await
            .expect("a batch of at most 500 rows is accepted");
    }
    let ids: Vec<UserId> = written.iter().map(|r| r.user_id).collect();
    let read = load_sorted(&*store, &ids).await;
    assert_eq!(
        read.len(),
        1200,
        "loading 1200 users (several IN lists) finds all of them"
    );
    assert_eq!(
        read, written,
        "every row of every batch reads back as written"
    );
}

async fn a_fresh_database_starts_at_epoch_zero_and_registers_nodes(store: Arc<dyn Store>) {
    assert_eq!(
        store
            .register_node("a", 1_000)
            .await
            .expect("registering works"),
        0
    );
    assert_eq!(
        store
            .register_node("b", 1_001)
            .await
            .expect("registering works"),
        0
    );
    let mut open: Vec<(String, i64)> = store
        .open_nodes()
        .await
        .expect("listing nodes works")
        .into_iter()
        .map(|r| (r.node, r.heartbeat_ms))
        .collect();
    open.sort();
    assert_eq!(open, vec![("a".into(), 1_000), ("b".into(), 1_001)]);
    assert_eq!(
        store
            .heartbeat("a", 5_000)
            .await
            .expect("a heartbeat works"),
        0
    );
    let a = store
        .open_nodes()
        .await
        .expect("listing nodes works")
        .into_iter()
        .find(|r| r.node == "a")
        .expect("a is open");
    assert_eq!(a.heartbeat_ms, 5_000, "the heartbeat is recorded");
}

async fn a_clean_stop_closes_only_that_nodes_record(store: Arc<dyn Store>) {
    store.register_node("a", 1_000).await.expect("a starts");
    store.register_node("b", 1_000).await.expect("b starts");
    store.stop_node("a", 2_000).await.expect("a stops cleanly");
    let open: Vec<String> = store
        .open_nodes()
        .await
        .expect("listing nodes works")
        .into_iter()
        .map(|r| r.node)
        .collect();
    assert_eq!(
        open,
        vec!["b".to_string()],
        "a clean stop closes a's record, not b's"
    );
    assert_eq!(
        store.register_node("c", 3_000).await.expect("c starts"),
        0,
        "starts and clean stops never move the epoch"
    );
}

async fn a_heartbeat_registers_a_node_whose_record_is_gone(store: Arc<dyn Store>) {
    store
        .heartbeat("ghost", 1_000)
        .await
        .expect("a heartbeat works");
    assert!(
        store
            .open_nodes()
            .await
            .expect("listing nodes works")
            .iter()
            .any(|r| r.node == "ghost"),
        "the heartbeat re-created the record"
    );
}

async fn recovering_a_crashed_node_touches_only_the_rows_it_left_online(store: Arc<dyn Store>) {
    store
        .register_node("dead", 1_000)
        .await
        .expect("the crashed node had started");
    let checkpointed = PresenceRow {
        chosen: Status::Busy,
        is_online: true,
        last_seen: Some(1_000),
        ..row(1, 3)
    };
    let never_checkpointed = PresenceRow {
        is_online: true,
        last_seen: Some(2_000),
        ..row(2, 7)
    };
    let offline = PresenceRow {
        last_seen: Some(1_500),
        checkpoint_at: Some(1_400),
        ..row(3, 2)
    };
    let reconnected_after_checkpoint = PresenceRow {
        is_online: true,
        last_seen: Some(9_000),
        checkpoint_at: Some(4_000),
        ..row(4, 1)
    };
    let elsewhere = PresenceRow {
        is_online: true,
        last_seen: Some(2_500),
        ..row(5, 9)
    };
    store
        .upsert_presence_batch(
            &[
                checkpointed.clone(),
                never_checkpointed.clone(),
                offline.clone(),
                reconnected_after_checkpoint.clone(),
            ],
            "dead",
        )
        .await
        .expect("the crashed node's rows are written");
    store
        .upsert_presence_batch(std::slice::from_ref(&elsewhere), "alive")
        .await
        .expect("another node's row is written");
    store
        .checkpoint_online(&[user(1)], 5_000)
        .await
        .expect("checkpoint works");

    assert!(
        store
            .claim_recovery("dead", "rescuer", None)
            .await
            .expect("claiming works"),
        "the first claim wins"
    );
    assert!(
        !store
            .claim_recovery("dead", "other", None)
            .await
            .expect("claiming works"),
        "a recovery is claimed once"
    );
    let left = store
        .left_online_by("dead", None, 2)
        .await
        .expect("listing works");
    assert_eq!(
        left,
        users([1, 2]),
        "the dead node's online rows, ascending, paged"
    );
    let rest = store
        .left_online_by("dead", Some(user(2)), 10)
        .await
        .expect("listing works");
    assert_eq!(rest, users([4]), "the next page starts after the cursor");
    store
        .recover_rows("dead", &users([1, 2, 4, 5]))
        .await
        .expect("recovering works");
    let epoch = store.bump_epoch().await.expect("the epoch rises");
    assert_eq!(epoch, 1, "a crash raises the epoch by one");
    store
        .finish_recovery("dead", 6_000)
        .await
        .expect("finishing works");

    let read = load_sorted(&*store, &users([1, 2, 3, 4, 5])).await;
    assert_eq!(
        read[0],
        PresenceRow {
            is_online: false,
            last_seen: Some(5_000),
            version: 4,
            offline_version: 1,
            checkpoint_at: Some(5_000),
            ..checkpointed
        },
        "a row left online goes offline, last seen at its checkpoint, one version up"
    );
    assert_eq!(
        read[1],
        PresenceRow {
            is_online: false,
            version: 8,
            offline_version: 1,
            ..never_checkpointed
        },
        "without a checkpoint, last_seen stays what it was"
    );
    assert_eq!(read[2], offline, "a row that was offline is left alone");
    assert_eq!(
        read[3],
        PresenceRow {
            is_online: false,
            version: 2,
            offline_version: 1,
            ..reconnected_after_checkpoint
        },
        "an older checkpoint does not move last_seen backwards"
    );
    assert_eq!(
        read[4], elsewhere,
        "a row another node wrote is not the dead node's to recover"
    );
    assert!(
        store
            .open_nodes()
            .await
            .expect("listing nodes works")
            .iter()
            .all(|r| r.node != "dead"),
        "a finished recovery closes the record"
    );
    assert!(
        store
            .left_online_by("dead", None, 10)
            .await
            .expect("listing works")
            .is_empty(),
        "nothing is left online by the recovered node"
    );
}

async fn a_recovery_whose_claimer_died_is_taken_over(store: Arc<dyn Store>) {
    store
        .register_node("dead", 1_000)
        .await
        .expect("the crashed node had started");
    assert!(
        store
            .claim_recovery("dead", "first", None)
            .await
            .expect("claiming works")
    );
    assert!(
        !store
            .claim_recovery("dead", "second", Some("someone"))
            .await
            .expect("claiming works"),
        "a take-over names the claimer it replaces"
    );
    assert!(
        store
            .claim_recovery("dead", "second", Some("first"))
            .await
            .expect("claiming works"),
        "the claim of a dead claimer is taken over"
    );
    let record = store
        .open_nodes()
        .await
        .expect("listing nodes works")
        .into_iter()
        .find(|r| r.node == "dead")
        .expect("the record is open until the recovery finishes");
    assert_eq!(record.recovered_by.as_deref(), Some("second"));
}

async fn custom_statuses_due_are_listed_soonest_first(store: Arc<dyn Store>) {
    let with_expiry = |id, at| PresenceRow {
        custom: Some(std::sync::Arc::new(CustomStatus {
            text: "away".into(),
            emoji: String::new(),
            expires_at: at,
        })),
        ..row(id, 1)
    };
    store
        .upsert_presence_batch(
            &[
                with_expiry(1, Some(3_000)),
                with_expiry(2, Some(1_000)),
                with_expiry(3, None),
                with_expiry(4, Some(9_000)),
            ],
            NODE,
        )
        .await
        .expect("rows are written");
    let due = store
        .custom_expiring(5_000, 10)
        .await
        .expect("listing works");
    assert_eq!(due, vec![(user(2), 1_000), (user(1), 3_000)]);
}

async fn checkpoint_online_stamps_only_the_given_users(store: Arc<dyn Store>) {
    let online = |id| PresenceRow {
        is_online: true,
        ..row(id, 1)
    };
    store
        .upsert_presence_batch(&[online(1), online(2), online(3)], NODE)
        .await
        .expect("rows are written");
    store
        .checkpoint_online(&users([1, 3, 99]), 777)
        .await
        .expect("checkpointing known and unknown users works");
    store
        .checkpoint_online(&[], 888)
        .await
        .expect("checkpointing nobody works");
    let read = load_sorted(&*store, &users([1, 2, 3, 99])).await;
    let checkpoints: Vec<_> = read
        .iter()
        .map(|r| (r.user_id.get(), r.checkpoint_at))
        .collect();
    assert_eq!(
        checkpoints,
        vec![(1, Some(777)), (2, None), (3, Some(777))],
        "only the given users are stamped, and no row is created for unknown ones"
    );
    assert!(
        read.iter().all(|r| r.version == 1),
        "a checkpoint is not a change of presence: versions stay"
    );
}

async fn contacts_are_symmetric(store: Arc<dyn Store>) {
    store
        .add_contacts(&[(user(1), user(2)), (user(3), user(1))])
        .await
        .expect("adding contacts works");
    assert_eq!(
        store.contacts_of(user(1)).await.expect("contacts_of works"),
        users([2, 3]),
        "user 1 has both contacts, ascending"
    );
    assert_eq!(
        store.contacts_of(user(2)).await.expect("contacts_of works"),
        users([1]),
        "a pair added as (1, 2) is also 2's contact"
    );
    assert_eq!(
        store.contacts_of(user(3)).await.expect("contacts_of works"),
        users([1]),
        "a pair added as (3, 1) is also 3's contact"
    );
    for (a, b, expected, why) in [
        (1, 2, true, "1 and 2 are contacts"),
        (2, 1, true, "contacts both ways"),
        (1, 3, true, "1 and 3 are contacts"),
        (2, 3, false, "contacts of a contact are not contacts"),
        (1, 1, false, "nobody is their own contact"),
        (4, 5, false, "strangers are not contacts"),
    ] {
        let of_a = store.contacts_of(user(a)).await.expect("contacts_of works");
        assert_eq!(of_a.contains(&user(b)), expected, "{why}");
    }
    assert!(
        store
            .contacts_of(user(9))
            .await
            .expect("contacts_of works")
            .is_empty(),
        "a user without contacts has none"
    );
}

async fn adding_contacts_twice_changes_nothing(store: Arc<dyn Store>) {
    let pairs = [(user(1), user(2)), (user(2), user(1)), (user(1), user(2))];
    store
        .add_contacts(&pairs)
        .await
        .expect("adding contacts works");
    store
        .add_contacts(&pairs)
        .await
        .expect("adding the same contacts again is not an error");
    store
        .add_contacts(&[(user(4), user(4))])
        .await
        .expect("a self pair is ignored, not an error");
    store
        .add_contacts(&[])
        .await
        .expect("adding no pairs works");
    assert_eq!(
        store.contacts_of(user(1)).await.expect("contacts_of works"),
        users([2]),
        "duplicates are stored once"
    );
    assert!(
        store
            .contacts_of(user(4))
            .await
            .expect("contacts_of works")
            .is_empty(),
        "a self pair is never stored"
    );
}

async fn removing_contacts_removes_both_directions(store: Arc<dyn Store>) {
    store
        .add_contacts(&[(user(1), user(2)), (user(1), user(3))])
        .await
        .expect("adding contacts works");
    store
        .remove_contacts(&[(user(2), user(1)), (user(5), user(6)), (user(7), user(7))])
        .await
        .expect("removing present and absent pairs works");
    store
        .remove_contacts(&[])
        .await
        .expect("removing no pairs works");
    assert_eq!(
        store.contacts_of(user(1)).await.expect("contacts_of works"),
        users([3]),
        "removing (2, 1) removes 1 -> 2"
    );
    assert!(
        store
            .contacts_of(user(2))
            .await
            .expect("contacts_of works")
            .is_empty(),
        "removing (2, 1) removes 2 -> 1"
    );
    assert!(
        !store
            .contacts_of(user(1))
            .await
            .expect("contacts_of works")
            .contains(&user(2)),
        "removed contacts are no longer contacts"
    );
}

async fn list_contacts_pages_upwards_from_the_cursor(store: Arc<dyn Store>) {
    let pairs: Vec<_> = (2..=11).rev().map(|k| (user(1), user(k))).collect();
    store
        .add_contacts(&pairs)
        .await
        .expect("adding contacts works");
    let page = |after: Option<u64>, limit| {
        let store = Arc::clone(&store);
        async move {
            store
                .list_contacts(user(1), after.map(user), limit)
                .await
                .expect("list_contacts works")
        }
    };
    assert_eq!(
        page(None, 4).await,
        users(2..=5),
        "the first page starts at the lowest id"
    );
    assert_eq!(
        page(Some(5), 4).await,
        users(6..=9),
        "the next page starts above the cursor"
    );
    assert_eq!(
        page(Some(9), 4).await,
        users([10, 11]),
        "the last page is short"
    );
    assert!(
        page(Some(11), 4).await.is_empty(),
        "nothing comes after the last contact"
    );
    assert_eq!(
        page(Some(3), 100).await,
        users(4..=11),
        "a large limit returns the rest"
    );
    assert!(
        page(None, 0).await.is_empty(),
        "a zero limit returns nothing"
    );
}

async fn contacts_of_many_reads_every_listed_user_across_statements(store: Arc<dyn Store>) {
    // User u (1..=1200) is linked to u + 5000: 1,200 listed users take three statements.
    let pairs: Vec<_> = (1..=1200).map(|u| (user(u), user(u + 5000))).collect();
    for chunk in pairs.chunks(MAX_ROWS_PER_STATEMENT) {
        store
            .add_contacts(chunk)
            .await
            .expect("adding contacts works");
    }
    store
        .add_contacts(&[(user(7), user(9000))])
        .await
        .expect("adding contacts works");
    let mut listed: Vec<UserId> = (1..=1200).rev().map(user).collect();
    listed.push(user(999_999));
    let got = store
        .contacts_of_many(&listed)
        .await
        .expect("contacts_of_many works");
    let mut want: Vec<(UserId, UserId)> = (1..=1200).map(|u| (user(u), user(u + 5000))).collect();
    want.push((user(7), user(9000)));
    want.sort_unstable();
    assert_eq!(
        got, want,
        "every pair of every listed user, ascending, and none of users not listed (5001.., 9000)"
    );
    assert!(
        store
            .contacts_of_many(&[])
            .await
            .expect("an empty list works")
            .is_empty(),
        "no users, no pairs"
    );
}

async fn empty_batches_are_accepted(store: Arc<dyn Store>) {
    store
        .upsert_presence_batch(&[], NODE)
        .await
        .expect("an empty upsert is a no-op");
    store
        .checkpoint_online(&[], 1)
        .await
        .expect("an empty checkpoint is a no-op");
    assert!(
        store
            .load_presence(&[])
            .await
            .expect("an empty load works")
            .is_empty(),
        "an empty load finds nothing"
    );
}

async fn concurrent_overlapping_upserts_do_not_fail(store: Arc<dyn Store>) {
    const TASKS: u64 = 4;
    const ROUNDS: u64 = 8;
    // Task t writes users 150·t + 1 ..= 150·t + 400: neighbours overlap by 250 rows. The first
    // round's inserts race for the same new keys (gap and insert-intention locks), later rounds
    // update the same rows (record locks).
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                for round in 1..=ROUNDS {
                    let batch: Vec<PresenceRow> = (150 * t + 1..=150 * t + 400)
                        .map(|id| PresenceRow {
                            last_seen: Some((round * 1000 + t) as i64),
                            ..row(id, round)
                        })
                        .collect();
                    store.upsert_presence_batch(&batch, NODE).await?;
                }
                Ok::<_, StoreError>(())
            })
        })
        .collect();
    for (t, task) in tasks.into_iter().enumerate() {
        let outcome = task.await.expect("the upsert task does not panic");
        if let Err(err) = outcome {
            panic!(
                "task {t}: sorted overlapping upserts must not fail (transient: {}): {err}",
                err.is_transient()
            );
        }
    }
    let all = 150 * (TASKS - 1) + 400;
    let read = load_sorted(&*store, &users(1..=all)).await;
    assert_eq!(
        read.len() as u64,
        all,
        "every user written by any task has a row"
    );
    assert!(
        read.iter().all(|r| r.version == ROUNDS),
        "every row ends at the last round's version"
    );
}

// ---------------------------------------------------------------------------------------------
// Backends.
// ---------------------------------------------------------------------------------------------

/// A migrated store and whatever keeps its database alive; dropping it removes the database.
struct TestStore {
    store: Arc<dyn Store>,
    database: TestDatabase,
}

enum TestDatabase {
    Sqlite(tempfile::TempDir),
    MySql(MySqlDatabase),
}

async fn sqlite_store() -> TestStore {
    let dir = tempfile::tempdir().expect("a temporary directory can be created");
    let url = format!("sqlite://{}", dir.path().join("presence.db").display());
    let store = store::connect(&url).await.expect("SQLite opens a new file");
    store.migrate().await.expect("SQLite migrations apply");
    TestStore {
        store,
        database: TestDatabase::Sqlite(dir),
    }
}

/// A fresh MySQL test database of its own.
async fn mysql_store() -> TestStore {
    let database = MySqlDatabase::create(mysql_db::admin_url()).await;
    let store = store::connect(&database.url())
        .await
        .expect("the store connects to its test database");
    store.migrate().await.expect("MySQL migrations apply");
    TestStore {
        store,
        database: TestDatabase::MySql(database),
    }
}

#[path = "common/mysql_db.rs"]
mod mysql_db;
use mysql_db::MySqlDatabase;

/// One `#[tokio::test]` per case and backend: `sqlite::case` always, `mysql::case` when MySQL is
/// configured.
macro_rules! store_suite {
    ($($case:ident),+ $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let db = super::sqlite_store().await;
                    super::$case(std::sync::Arc::clone(&db.store)).await;
                }
            )+
        }

        mod mysql {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                #[cfg_attr(not(mysql_tests), ignore = "set PRESENCE_TEST_MYSQL_URL to run the MySQL tests")]
                async fn $case() {
                    let db = super::mysql_store().await;
                    super::$case(std::sync::Arc::clone(&db.store)).await;
                }
            )+
        }
    };
}

store_suite!(
    migrating_twice_is_harmless,
    loading_unknown_users_finds_no_rows,
    an_upserted_row_loads_back_with_every_field,
    an_upsert_with_a_lower_version_changes_nothing,
    last_seen_never_moves_backwards,
    twelve_hundred_rows_are_written_in_batches_of_at_most_five_hundred,
    a_fresh_database_starts_at_epoch_zero_and_registers_nodes,
    a_clean_stop_closes_only_that_nodes_record,
    a_heartbeat_registers_a_node_whose_record_is_gone,
    recovering_a_crashed_node_touches_only_the_rows_it_left_online,
    a_recovery_whose_claimer_died_is_taken_over,
    custom_statuses_due_are_listed_soonest_first,
    checkpoint_online_stamps_only_the_given_users,
    contacts_are_symmetric,
    adding_contacts_twice_changes_nothing,
    removing_contacts_removes_both_directions,
    list_contacts_pages_upwards_from_the_cursor,
    contacts_of_many_reads_every_listed_user_across_statements,
    empty_batches_are_accepted,
    concurrent_overlapping_upserts_do_not_fail,
);

// ---------------------------------------------------------------------------------------------
// Backend-specific behaviour.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn an_unknown_url_scheme_is_refused() {
    let err = store::connect("postgres://localhost/presence")
        .await
        .err()
        .expect("only sqlite and mysql URLs are supported");
    assert!(
        matches!(err, StoreError::UnsupportedUrl(_)),
        "the error names the unsupported URL, got {err}"
    );
}

#[tokio::test]
async fn sqlite_memory_urls_work() {
    let store = store::connect("sqlite::memory:")
        .await
        .expect("an in-memory database opens");
    store.migrate().await.expect("it migrates");
    store
        .upsert_presence_batch(&[row(1, 1)], NODE)
        .await
        .expect("it takes writes");
    // Several round trips: the single connection must outlive each of them.
    for _ in 0..3 {
        assert_eq!(
            load_one(&*store, 1).await,
            Some(row(1, 1)),
            "the in-memory database keeps its rows between statements"
        );
    }
}

#[tokio::test]
async fn sqlite_creates_a_missing_file_and_keeps_rows_across_reopening() {
    let dir = tempfile::tempdir().expect("a temporary directory can be created");
    let path = dir.path().join("new.db");
    let url = format!("sqlite://{}", path.display());
    {
        let store = store::connect(&url)
            .await
            .expect("a missing file is created");
        store.migrate().await.expect("it migrates");
        store
            .upsert_presence_batch(&[row(1, 3)], NODE)
            .await
            .expect("it takes writes");
    }
    assert!(
        path.exists(),
        "the database file was created at {}",
        path.display()
    );
    let store = store::connect(&url).await.expect("the file reopens");
    store
        .migrate()
        .await
        .expect("migrating an existing file is a no-op");
    assert_eq!(
        load_one(&*store, 1).await,
        Some(row(1, 3)),
        "rows survive closing and reopening the file"
    );
}

#[tokio::test]
async fn sqlite_a_row_with_an_unknown_status_is_reported_corrupt() {
    let db = sqlite_store().await;
    let TestDatabase::Sqlite(dir) = &db.database else {
        unreachable!("sqlite_store keeps a temporary directory")
    };
    let url = format!("sqlite://{}", dir.path().join("presence.db").display());
    let mut raw = sqlx::SqliteConnection::connect(&url)
        .await
        .expect("a second connection to the file opens");
    raw.execute(
        "INSERT INTO presence (user_id, status, is_online, version, epoch) \
         VALUES (5, 'sleeping', 0, 1, 0)",
    )
    .await
    .expect("raw insert works");
    let err = db
        .store
        .load_presence(&[user(5)])
        .await
        .expect_err("an unknown status cannot be loaded");
    assert!(
        matches!(err, StoreError::Corrupt { user: 5, .. }),
        "the error names the corrupt user, got {err}"
    );
    assert!(
        !err.is_transient(),
        "a corrupt row does not heal by retrying"
    );
}

#[tokio::test]
async fn sqlite_busy_is_transient_and_constraint_violations_are_not() {
    let db = sqlite_store().await;
    let TestDatabase::Sqlite(dir) = &db.database else {
        unreachable!("sqlite_store keeps a temporary directory")
    };
    let url = format!("sqlite://{}", dir.path().join("presence.db").display());
    let mut holder = sqlx::SqliteConnection::connect(&url)
        .await
        .expect("a connection opens");
    holder
        .execute("BEGIN IMMEDIATE")
        .await
        .expect("the write lock is taken");
    let options: sqlx::sqlite::SqliteConnectOptions = url.parse().expect("the URL parses");
    let mut impatient = sqlx::SqliteConnection::connect_with(
        &options.busy_timeout(std::time::Duration::from_millis(0)),
    )
    .await
    .expect("a second connection opens");
    let busy = impatient
        .execute("INSERT INTO presence_meta (name, value) VALUES ('x', 1)")
        .await
        .expect_err("the write lock is held elsewhere");
    let busy = SqliteStore::map_error(busy);
    assert!(
        busy.is_transient(),
        "'database is locked' is worth retrying: {busy}"
    );
    holder
        .execute("ROLLBACK")
        .await
        .expect("the lock is released");

    let violation = impatient
        .execute("INSERT INTO contacts (user_id, contact_id) VALUES (1, 1)")
        .await
        .expect_err("a self pair violates the CHECK constraint");
    let violation = SqliteStore::map_error(violation);
    assert!(
        !violation.is_transient(),
        "a constraint violation fails again on retry: {violation}"
    );
}

#[tokio::test]
#[cfg_attr(
    not(mysql_tests),
    ignore = "set PRESENCE_TEST_MYSQL_URL to run the MySQL tests"
)]
async fn mysql_lock_wait_timeouts_are_transient_and_constraint_violations_are_not() {
    let db = mysql_store().await;
    let TestDatabase::MySql(database) = &db.database else {
        unreachable!("mysql_store keeps a MySQL database")
    };
    db.store
        .upsert_presence_batch(&[row(1, 1)], NODE)
        .await
        .expect("a row to lock is written");
    let mut holder = sqlx::MySqlConnection::connect(&database.url())
        .await
        .expect("a connection opens");
    let mut waiter = sqlx::MySqlConnection::connect(&database.url())
        .await
        .expect("a second connection opens");
    holder.execute("BEGIN").await.expect("a transaction starts");
    holder
        .execute("SELECT * FROM presence WHERE user_id = 1 FOR UPDATE")
        .await
        .expect("the row is locked");
    waiter
        .execute("SET SESSION innodb_lock_wait_timeout = 1")
        .await
        .expect("the wait is shortened");
    let timeout = waiter
        .execute("UPDATE presence SET version = 2 WHERE user_id = 1")
        .await
        .expect_err("the row is locked elsewhere");
    let timeout = MySqlStore::map_error(timeout);
    assert!(
        timeout.is_transient(),
        "a lock wait timeout is worth retrying: {timeout}"
    );
    holder
        .execute("ROLLBACK")
        .await
        .expect("the lock is released");

    let violation = waiter
        .execute("INSERT INTO presence (user_id, status, is_online, version, epoch) VALUES (1, 'online', 0, 1, 0)")
        .await
        .expect_err("user 1 already has a row");
    let violation = MySqlStore::map_error(violation);
    assert!(
        !violation.is_transient(),
        "a duplicate key fails again on retry: {violation}"
    );
}

/// Several nodes starting at once on a fresh database (a deployment's first rollout) each run
/// the migrations: all must succeed, whoever goes first.
async fn nodes_starting_together_all_migrate(url: &str) {
    let stores = futures::future::join_all((0..4).map(|_| store::connect(url))).await;
    let stores: Vec<_> = stores
        .into_iter()
        .map(|s| s.expect("each node connects"))
        .collect();
    let results = futures::future::join_all(stores.iter().map(|s| s.migrate())).await;
    for (i, r) in results.into_iter().enumerate() {
        r.unwrap_or_else(|e| panic!("node {i}'s migration fails beside the others: {e}"));
    }
    let row = row(1, 1);
    stores[0]
        .upsert_presence_batch(&[row], NODE)
        .await
        .expect("the schema is there");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(mysql_tests),
    ignore = "set PRESENCE_TEST_MYSQL_URL to run the MySQL tests"
)]
async fn mysql_nodes_starting_together_on_a_fresh_database_all_migrate() {
    let database = MySqlDatabase::create(mysql_db::admin_url()).await;
    nodes_starting_together_all_migrate(&database.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_nodes_starting_together_on_a_fresh_file_all_migrate() {
    let dir = tempfile::tempdir().expect("a temporary directory can be created");
    let url = format!("sqlite://{}", dir.path().join("presence.db").display());
    nodes_starting_together_all_migrate(&url).await;
}
