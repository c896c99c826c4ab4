//! Mass reconnect: every stream dropped and reopened at once (a deploy, a network blip). No
//! latency cliff, no database write storm (the anti-flap grace absorbs the wave), and when
//! admission has to pace the wave, refusals are UNAVAILABLE with a retry hint and succeed on
//! retry.
use std::time::{Duration, Instant};

use futures::StreamExt;
use presence::settings::Settings;
use tonic::transport::Channel;

use crate::harness::{
    Device, TestServer, add_contacts, exclusive, percentile, pushback_of, stats, user,
    wait_for_stats,
};

const DEVICES: u64 = 2000;
/// HTTP/2 connections the devices are spread over.
const CONNECTIONS: u64 = 8;
/// Most refusals one device may get before the test gives up on it.
const MAX_REFUSALS: u32 = 30;

/// What one wave measured.
struct Wave {
    /// Time from the start of the wave to each device's welcome, retries included.
    latencies: Vec<Duration>,
    /// Refused attempts (each answered UNAVAILABLE with a retry hint).
    refusals: u64,
    /// Database rows written, as GetStats reports them, before and after the wave.
    db_rows: (u64, u64),
    took: Duration,
    /// How long the same devices took to connect before the wave, paced (64 at a time): the
    /// server's own throughput, which bounds any wave from below.
    paced: Duration,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mass_reconnect_has_no_latency_cliff_and_no_write_storm() {
    let _machine = exclusive().await;
    let mut wave = reconnect_wave(|s| s.offline_grace_ms = 5000).await;
    let (p50, p99) = (
        percentile(&mut wave.latencies, 50.0),
        percentile(&mut wave.latencies, 99.0),
    );
    let max = *wave.latencies.iter().max().expect("latencies measured");
    eprintln!(
        "mass reconnect of {DEVICES} devices (max_pending_setups default, grace 5 s): wave took \
         {:?} (the same devices paced 64 at a time: {:?}); time to welcome p50 {p50:?}, p99 \
         {p99:?}, max {max:?}; {} refusals; db_rows {} before, {} after",
        wave.took, wave.paced, wave.refusals, wave.db_rows.0, wave.db_rows.1
    );
    let written = wave.db_rows.1 - wave.db_rows.0;
    assert!(
        written <= DEVICES / 100,
        "the grace absorbs the wave: at most 1% of the users' rows rewritten, got {written}"
    );
    // The latency figures above are reported, not asserted: speed is measured with
    // presence-bench in release builds, never asserted in `cargo test` (a loaded CI machine
    // made a 2x-of-paced bound flaky). What must hold is that every device came back.
    assert_eq!(
        wave.latencies.len(),
        DEVICES as usize,
        "every device of the wave got its welcome"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mass_reconnect_beyond_admission_is_refused_with_a_retry_hint_and_retries_succeed() {
    let _machine = exclusive().await;
    let mut wave = reconnect_wave(|s| {
        s.max_pending_setups = 16;
        // Longer than the paced wave, so users waiting for admission do not go offline.
        s.offline_grace_ms = 20_000;
    })
    .await;
    let p99 = percentile(&mut wave.latencies, 99.0);
    eprintln!(
        "mass reconnect of {DEVICES} devices with max_pending_setups 16: wave took {:?} (paced: \
         {:?}); p99 time to welcome {p99:?}; {} refusals (all UNAVAILABLE with a retry hint, \
         all retried successfully); db_rows {} before, {} after",
        wave.took, wave.paced, wave.refusals, wave.db_rows.0, wave.db_rows.1
    );
    assert!(
        wave.refusals > 0,
        "{DEVICES} simultaneous streams exceed 16 pending setups: some must be refused"
    );
    assert_eq!(
        wave.latencies.len() as u64,
        DEVICES,
        "every device got in after retrying"
    );
}

/// Connects every device with contacts (a ring: each user has two), waits until the database
/// is quiet, drops every stream and connection at once and reopens them all at once.
async fn reconnect_wave(configure: impl FnOnce(&mut Settings)) -> Wave {
    let server = TestServer::start(|s| {
        s.flush_interval_ms = 100;
        configure(s);
    })
    .await;
    let control = server.connection().await;
    let ring: Vec<(u64, u64)> = (1..=DEVICES).map(|u| (u, u % DEVICES + 1)).collect();
    add_contacts(&control, &ring).await;

    let channels = connections(&server).await;
    let pacing = Instant::now();
    let devices: Vec<Device> = futures::stream::iter(1..=DEVICES)
        .map(|u| {
            let channel = channels[(u % CONNECTIONS) as usize].clone();
            async move { connect_retrying(&channel, u, Instant::now()).await.0 }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    wait_for_stats(
        &control,
        "every device connected",
        Duration::from_secs(10),
        |s| s.connections == DEVICES,
    )
    .await;
    let paced = pacing.elapsed();
    let before = quiet_db_rows(&server, &control).await;

    let started = Instant::now();
    drop(devices);
    drop(channels);
    let channels = connections(&server).await;
    let attempts = (1..=DEVICES).map(|u| {
        let channel = channels[(u % CONNECTIONS) as usize].clone();
        async move { connect_retrying(&channel, u, started).await }
    });
    let results = futures::future::join_all(attempts).await;
    let took = started.elapsed();
    let refusals = results.iter().map(|r| u64::from(r.2)).sum();
    let latencies = results.iter().map(|r| r.1).collect();
    wait_for_stats(
        &control,
        "every device reconnected and every old stream gone",
        Duration::from_secs(10),
        |s| s.connections == DEVICES && s.online_users == DEVICES,
    )
    .await;
    let after = quiet_db_rows(&server, &control).await;
    drop(results);
    Wave {
        latencies,
        refusals,
        db_rows: (before, after),
        took,
        paced,
    }
}

async fn connections(server: &TestServer) -> Vec<Channel> {
    futures::future::join_all((0..CONNECTIONS).map(|_| server.connection())).await
}

/// Opens a device, retrying refusals after the server's hint (with jitter, so the retries do
/// not come back as one wave). Returns the device, the time from `since` to its welcome, and
/// how many times it was refused.
async fn connect_retrying(channel: &Channel, u: u64, since: Instant) -> (Device, Duration, u32) {
    let mut refusals = 0;
    loop {
        match Device::connect_within(channel, &user(u), Duration::from_secs(20)).await {
            Ok(device) => return (device, since.elapsed(), refusals),
            Err(status) => {
                let hint = pushback_of(&status);
                refusals += 1;
                assert!(
                    refusals <= MAX_REFUSALS,
                    "user {u} was refused {refusals} times: {status:?}"
                );
                tokio::time::sleep(hint.mul_f64(0.75 + rand::random::<f64>() * 0.5)).await;
            }
        }
    }
}

/// The database rows written so far, once nothing is waiting to be written and the count
/// held still over a few flush intervals.
async fn quiet_db_rows(server: &TestServer, control: &Channel) -> u64 {
    let settle = Duration::from_millis(3 * server.settings.flush_interval_ms);
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last = None;
    loop {
        let rows = stats(control).await.db_rows;
        if server.engine.stats().dirty_users == 0 {
            if last == Some(rows) {
                return rows;
            }
            last = Some(rows);
        } else {
            last = None;
        }
        assert!(
            Instant::now() < deadline,
            "the database writes did not settle within 15 s: {:?}",
            server.engine.stats()
        );
        tokio::time::sleep(settle).await;
    }
}
