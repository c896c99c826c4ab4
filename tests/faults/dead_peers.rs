//! Dead peers: a device whose network vanishes without a FIN or an RST must not stay "online"
//! for ever. The server's HTTP/2 keepalive finds out within interval + timeout, and the stream
//! is ended as if the device had closed it.
use std::time::{Duration, Instant};

use presence::pb;

use crate::harness::{Device, TestServer, WAIT, Watcher, add_contacts, exclusive, user};
use crate::proxy::BlackholeProxy;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_behind_a_vanished_network_is_announced_offline_within_the_keepalive() {
    let _machine = exclusive().await;
    let server = TestServer::start(|s| {
        s.keepalive_interval_s = 1;
        s.keepalive_timeout_s = 1;
        s.offline_grace_ms = 0;
    })
    .await;
    let direct = server.connection().await;
    add_contacts(&direct, &[(1, 2)]).await;
    let mut contact = Watcher::open(&direct, &user(2), &[]).await;
    assert_eq!(
        contact.snapshot[0].status(),
        pb::Status::Offline,
        "user 1 starts offline"
    );

    let proxy = BlackholeProxy::start(server.addr).await;
    let through_proxy = crate::harness::connect(proxy.addr).await;
    let _device = Device::connect(&through_proxy, &user(1))
        .await
        .expect("a device connects through the proxy");
    let online = contact.next_update_of(1, WAIT).await;
    assert_eq!(
        online.status(),
        pb::Status::Online,
        "the contact sees the device come online through the proxy (positive control)"
    );

    let budget = Duration::from_secs(
        server.settings.keepalive_interval_s + server.settings.keepalive_timeout_s,
    );
    // Scheduling slack on a loaded 2-core machine: the keepalive timer ticks on its own.
    let slack = Duration::from_millis(1000);
    let cut = Instant::now();
    proxy.blackhole();
    let offline = contact.next_update_of(1, budget + slack + WAIT).await;
    let detected = cut.elapsed();
    eprintln!(
        "dead peer: offline announced {detected:?} after the network vanished \
         (keepalive interval + timeout = {budget:?}, grace 0)"
    );
    assert_eq!(
        offline.status(),
        pb::Status::Offline,
        "the dead device's user goes offline"
    );
    assert!(
        detected <= budget + slack,
        "a dead peer is detected within keepalive interval + timeout ({budget:?}) + {slack:?}, \
         took {detected:?}"
    );
}
