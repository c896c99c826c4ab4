//! The relay (issue 20): one stream carrying many device sessions for a proxy. Every rule of
//! Authenticate holds per session, and a change is delivered once per stream, grouped by view.
use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use jsonwebtoken::Algorithm;
use presence::pb::{
    self,
    Status::{Busy, Offline, Online},
    relay_request::Kind as Cmd,
    relay_response::Kind as Out,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

use crate::helpers::*;

const X: u64 = 1;
const W: u64 = 2;
const V: u64 = 3;
const STRANGER: u64 = 9;

/// A proxy's relay stream: sends commands, keeps what arrives per session.
struct Relay {
    tx: mpsc::Sender<pb::RelayRequest>,
    rx: tonic::Streaming<pb::RelayResponse>,
    /// The newest version each session got of each user, checked to strictly increase.
    versions: HashMap<(u64, u64), u64>,
}

impl Relay {
    async fn open(app: &TestApp, caller: &Caller) -> Result<Relay, tonic::Status> {
        let (tx, rx) = mpsc::channel(256);
        let mut client = pb::relay_service_client::RelayServiceClient::new(app.connection().await);
        let rx = client
            .relay(caller.request(ReceiverStream::new(rx)))
            .await?
            .into_inner();
        Ok(Relay {
            tx,
            rx,
            versions: HashMap::new(),
        })
    }

    async fn send(&self, cmd: Cmd) {
        self.tx
            .send(pb::RelayRequest { kind: Some(cmd) })
            .await
            .expect("the relay stream is open");
    }

    async fn open_session(&self, session: u64, user: u64) {
        self.send(Cmd::Open(pb::RelayOpen {
            session_id: session,
            user: Some(pb::relay_open::User::UserId(user)),
            device: "browser".into(),
            platform: pb::Platform::Web as i32,
        }))
        .await;
    }

    /// The next response, within [`WAIT`]; deliveries are checked for increasing versions.
    async fn next(&mut self) -> Out {
        let msg = tokio::time::timeout(WAIT, self.rx.next())
            .await
            .expect("a relay message within the wait")
            .expect("the relay stream is open")
            .expect("no error on the relay stream");
        let out = msg.kind.expect("every response has a kind");
        if let Out::Delivery(d) = &out {
            for g in &d.groups {
                let p = g.presence.as_ref().expect("a group has a presence");
                for &s in &g.session_ids {
                    let before = self.versions.insert((s, p.user_id), p.version);
                    assert!(
                        before.is_none_or(|v| p.version > v),
                        "session {s}: versions of user {} strictly increase ({before:?} then {})",
                        p.user_id,
                        p.version
                    );
                }
            }
        }
        out
    }

    /// Reads until `pick` returns something, skipping the rest.
    async fn until<T>(&mut self, mut pick: impl FnMut(&Out) -> Option<T>) -> T {
        let deadline = Instant::now() + WAIT;
        loop {
            assert!(
                Instant::now() < deadline,
                "the awaited relay message did not come"
            );
            let out = self.next().await;
            if let Some(t) = pick(&out) {
                return t;
            }
        }
    }

    /// The welcomes (all pages) of `sessions`, in whatever order they come.
    async fn welcomes(&mut self, sessions: &[u64]) -> HashMap<u64, pb::Welcome> {
        let mut whole: HashMap<u64, pb::Welcome> = HashMap::new();
        let mut done = Vec::new();
        while done.len() < sessions.len() {
            let (session, page) = self
                .until(|o| match o {
                    Out::Welcome(w) if sessions.contains(&w.session_id) => {
                        Some((w.session_id, w.welcome.clone().expect("a welcome page")))
                    }
                    Out::Ended(e) if sessions.contains(&e.session_id) => {
                        panic!("session {} ended: {e:?}", e.session_id)
                    }
                    _ => None,
                })
                .await;
            assert!(
                !done.contains(&session),
                "session {session}: no page after the last"
            );
            if page.last_page {
                done.push(session);
            }
            match whole.get_mut(&session) {
                None => {
                    whole.insert(session, page);
                }
                Some(w) => w.contacts.extend(page.contacts),
            }
        }
        for (session, w) in &whole {
            for c in &w.contacts {
                self.versions.insert((*session, c.user_id), c.version);
            }
        }
        whole
    }

    /// The next delivery group about `user`: (view, sessions).
    async fn group_of(&mut self, user: u64) -> (pb::UserPresence, Vec<u64>) {
        self.until(|o| match o {
            Out::Delivery(d) => d.groups.iter().find_map(|g| {
                let p = g.presence.as_ref()?;
                (p.user_id == user).then(|| (p.clone(), g.session_ids.clone()))
            }),
            _ => None,
        })
        .await
    }

    /// A ping barrier: everything before the pong.
    async fn barrier(&mut self, nonce: u64) -> Vec<Out> {
        self.send(Cmd::Ping(pb::Ping { nonce })).await;
        let mut before = Vec::new();
        loop {
            match self.next().await {
                Out::Pong(p) if p.nonce == nonce => return before,
                other => before.push(other),
            }
        }
    }
}

#[tokio::test]
async fn only_service_callers_may_open_a_relay() {
    let app = spawn_app(|_| {}).await;
    let r = Relay::open(&app, &user(1)).await.map(|_| ());
    assert_refused(
        r,
        Code::PermissionDenied,
        &["service"],
        "a user is not a proxy",
    );
}

#[tokio::test]
async fn a_change_is_delivered_once_per_stream_grouped_by_view() {
    let app = spawn_app(|_| {}).await;
    app.add_contacts(&[(X, W), (X, V)]).await;
    let mut relay = Relay::open(&app, &service()).await.unwrap();
    relay.open_session(10, W).await;
    relay.open_session(11, W).await;
    relay.open_session(12, V).await;
    relay.open_session(13, STRANGER).await;
    relay.welcomes(&[10, 11, 12, 13]).await;
    let _x = app.device(&user(X)).await;
    let (view, mut sessions) = relay.group_of(X).await;
    sessions.sort_unstable();
    assert_eq!(
        (view.status(), sessions),
        (Online, vec![10, 11, 12]),
        "one group, every contact session"
    );
    let before_pong = relay.barrier(1).await;
    assert!(
        before_pong.iter().all(|o| !matches!(o, Out::Delivery(d) if d.groups.iter().any(|g| g.session_ids.contains(&13)))),
        "the stranger's session sees nothing of a contacts-only user"
    );
}

#[tokio::test]
async fn sessions_of_one_user_are_one_presence_and_the_stream_ending_ends_them_all() {
    let app = spawn_app(|_| {}).await;
    app.add_contacts(&[(X, W)]).await;
    let mut w = app.device(&user(W)).await;
    let mut relay = Relay::open(&app, &service()).await.unwrap();
    relay.open_session(1, X).await;
    relay.open_session(2, X).await;
    relay.welcomes(&[1, 2]).await;
    let online = w.next_update_of(X, WAIT).await;
    assert_eq!(online.status(), Online);
    relay
        .send(Cmd::Close(pb::RelayClose { session_id: 1 }))
        .await;
    relay.barrier(1).await;
    app.update_status(&user(W), Busy).await.unwrap();
    assert_eq!(
        w.next_update().await.user_id,
        W,
        "closing one of two sessions sends nothing"
    );
    drop(relay);
    let offline = w.next_update_of(X, WAIT).await;
    assert_eq!(
        (offline.status(), offline.version),
        (Offline, online.version + 1),
        "the stream went: its sessions went"
    );
}

#[tokio::test]
async fn session_commands_follow_the_rules_of_device_streams() {
    let app = spawn_app(|s| s.rate_status_per_min = 2).await;
    app.add_contacts(&[(X, W)]).await;
    let mut w = app.device(&user(W)).await;
    let mut relay = Relay::open(&app, &service()).await.unwrap();
    relay.open_session(5, X).await;
    // Sent before the welcome: kept until the session is open.
    relay
        .send(Cmd::UpdateStatus(pb::RelayUpdateStatus {
            session_id: 5,
            status: Busy as i32,
            request_id: 1,
        }))
        .await;
    relay.welcomes(&[5]).await;
    let online = w.next_update_of(X, WAIT).await;
    let busy = w.next_update_of(X, WAIT).await;
    assert_eq!(
        (online.status(), busy.status()),
        (Online, Busy),
        "the session came online, then its waiting command ran"
    );
    relay
        .send(Cmd::UpdateStatus(pb::RelayUpdateStatus {
            session_id: 5,
            status: 0,
            request_id: 2,
        }))
        .await;
    let refused = relay
        .until(|o| match o {
            Out::Result(r) if r.request_id == 2 => Some(r.clone()),
            _ => None,
        })
        .await;
    assert_eq!(refused.code, Code::InvalidArgument as i32, "{refused:?}");
    assert!(
        refused.message.contains("update_status.status"),
        "{refused:?}"
    );
    relay
        .send(Cmd::UpdateStatus(pb::RelayUpdateStatus {
            session_id: 5,
            status: Online as i32,
            request_id: 3,
        }))
        .await;
    relay
        .send(Cmd::UpdateStatus(pb::RelayUpdateStatus {
            session_id: 5,
            status: Busy as i32,
            request_id: 4,
        }))
        .await;
    let limited = relay
        .until(|o| match o {
            Out::Result(r) if r.request_id == 4 => Some(r.clone()),
            _ => None,
        })
        .await;
    assert_eq!(
        limited.code,
        Code::ResourceExhausted as i32,
        "the user's status rate limit: {limited:?}"
    );
    relay
        .send(Cmd::GetPresence(pb::RelayGetPresence {
            session_id: 5,
            request_id: 9,
            user_ids: vec![W, STRANGER],
        }))
        .await;
    let answer = relay
        .until(|o| match o {
            Out::Result(r) if r.request_id == 9 => Some(r.clone()),
            _ => None,
        })
        .await;
    assert_eq!(answer.code, 0);
    assert_eq!(
        answer.users.iter().map(|u| u.user_id).collect::<Vec<_>>(),
        vec![W, STRANGER]
    );
    assert_eq!(answer.users[0].status(), Online, "as user X sees them");
    relay
        .send(Cmd::UpdateStatus(pb::RelayUpdateStatus {
            session_id: 77,
            status: Busy as i32,
            request_id: 10,
        }))
        .await;
    let unknown = relay
        .until(|o| match o {
            Out::Result(r) if r.request_id == 10 => Some(r.clone()),
            _ => None,
        })
        .await;
    assert_eq!(unknown.code, Code::FailedPrecondition as i32, "{unknown:?}");
}

#[tokio::test]
async fn a_session_opened_with_a_user_token_ends_when_it_expires_and_the_others_go_on() {
    let app = spawn_jwt_app(|_| {}).await;
    app.add_contacts(&[(X, W)]).await;
    let mut relay = Relay::open(&app, &app.service_caller()).await.unwrap();
    let mut claims = app.claims(&X.to_string());
    claims["exp"] = (unix_now() + 2).into();
    relay
        .send(Cmd::Open(pb::RelayOpen {
            session_id: 1,
            user: Some(pb::relay_open::User::UserToken(sign(
                &claims,
                Algorithm::HS256,
                SECRET,
            ))),
            device: "browser".into(),
            platform: 0,
        }))
        .await;
    relay
        .send(Cmd::Open(pb::RelayOpen {
            session_id: 2,
            user: Some(pb::relay_open::User::UserToken(app.user_token(W))),
            device: "browser".into(),
            platform: 0,
        }))
        .await;
    relay.welcomes(&[1, 2]).await;
    let started = Instant::now();
    let ended = relay
        .until(|o| match o {
            Out::Ended(e) => Some(e.clone()),
            _ => None,
        })
        .await;
    assert_eq!(
        (ended.session_id, ended.code),
        (1, Code::Unauthenticated as i32),
        "{ended:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(4));
    let (offline, sessions) = relay.group_of(X).await;
    assert_eq!(
        (offline.status(), sessions),
        (Offline, vec![2]),
        "X's session is gone; W's goes on"
    );
    relay
        .send(Cmd::Open(pb::RelayOpen {
            session_id: 3,
            user: Some(pb::relay_open::User::UserToken("not-a-token".into())),
            device: "browser".into(),
            platform: 0,
        }))
        .await;
    let refused = relay
        .until(|o| match o {
            Out::Ended(e) if e.session_id == 3 => Some(e.clone()),
            _ => None,
        })
        .await;
    assert_eq!(refused.code, Code::Unauthenticated as i32);
}

#[tokio::test]
async fn a_proxy_closing_its_side_gets_every_pending_answer_then_a_clean_end() {
    let app = spawn_app(|_| {}).await;
    app.add_contacts(&[(X, W)]).await;
    let relay = Relay::open(&app, &service()).await.unwrap();
    relay.open_session(1, X).await;
    relay.open_session(2, W).await;
    // Waits in session 1 until it is open.
    relay
        .send(Cmd::GetPresence(pb::RelayGetPresence {
            session_id: 1,
            request_id: 7,
            user_ids: vec![W],
        }))
        .await;
    let Relay { tx, mut rx, .. } = relay;
    drop(tx);
    let mut welcomed = Vec::new();
    let mut answered = false;
    loop {
        let msg = tokio::time::timeout(WAIT, rx.next())
            .await
            .expect("the stream ends within the wait");
        match msg {
            None => break,
            Some(Err(status)) => {
                panic!("a half-closed relay stream ends cleanly, not with {status:?}")
            }
            Some(Ok(m)) => match m.kind {
                Some(Out::Welcome(w)) if w.welcome.as_ref().is_some_and(|w| w.last_page) => {
                    welcomed.push(w.session_id)
                }
                Some(Out::Result(r)) if r.request_id == 7 => answered = true,
                _ => {}
            },
        }
    }
    welcomed.sort_unstable();
    assert_eq!(welcomed, [1, 2], "sessions still opening got their welcome");
    assert!(
        answered,
        "the read waiting behind the opening session was answered"
    );
    let w = app.device(&user(W)).await;
    assert_eq!(
        w.contact(X).status(),
        Offline,
        "the stream's sessions went with it"
    );
}

#[tokio::test]
async fn a_server_shutting_down_ends_relay_streams_as_unavailable() {
    let mut app = spawn_app(|s| s.shutdown_deadline_s = 10).await;
    let mut relay = Relay::open(&app, &service()).await.unwrap();
    relay.open_session(1, X).await;
    relay.welcomes(&[1]).await;
    let started = Instant::now();
    let stopping = tokio::spawn(async move {
        app.stop().await;
    });
    let status = loop {
        match tokio::time::timeout(WAIT, relay.rx.next())
            .await
            .expect("the stream ends within the wait")
        {
            Some(Ok(_)) => continue,
            Some(Err(status)) => break status,
            None => {
                panic!("the stream must end with UNAVAILABLE, so the proxy reconnects elsewhere")
            }
        }
    };
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    stopping.await.expect("the server stops");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the relay stream does not hold the shutdown to its deadline: {:?}",
        started.elapsed()
    );
}

/// A service token of `name` expiring in `ttl_s` seconds.
fn service_token(app: &TestApp, name: &str, ttl_s: u64) -> String {
    let mut claims = app.claims(name);
    claims["role"] = "service".into();
    claims["exp"] = (unix_now() + ttl_s).into();
    sign(&claims, Algorithm::HS256, SECRET)
}

#[tokio::test]
async fn a_relay_stream_ends_when_its_service_token_expires_unless_refreshed() {
    let app = spawn_jwt_app(|_| {}).await;
    let mut expiring = Relay::open(&app, &bearer(&service_token(&app, "edge", 2)))
        .await
        .unwrap();
    let mut refreshed = Relay::open(&app, &bearer(&service_token(&app, "edge", 2)))
        .await
        .unwrap();
    expiring.open_session(1, X).await;
    refreshed.open_session(2, W).await;
    expiring.welcomes(&[1]).await;
    refreshed.welcomes(&[2]).await;

    // Refreshes that must be refused: a user's token, another service's, garbage.
    for (request_id, token) in [
        (1, app.user_token(X)),
        (2, service_token(&app, "someone-else", 600)),
        (3, "not-a-token".to_string()),
    ] {
        refreshed
            .send(Cmd::Refresh(pb::RelayRefresh {
                service_token: token,
                request_id,
            }))
            .await;
        let r = refreshed
            .until(|o| match o {
                Out::Result(r) if r.request_id == request_id => Some(r.clone()),
                _ => None,
            })
            .await;
        assert_ne!(r.code, 0, "refresh {request_id} is refused: {r:?}");
    }
    refreshed
        .send(Cmd::Refresh(pb::RelayRefresh {
            service_token: service_token(&app, "edge", 600),
            request_id: 4,
        }))
        .await;
    let ok = refreshed
        .until(|o| match o {
            Out::Result(r) if r.request_id == 4 => Some(r.clone()),
            _ => None,
        })
        .await;
    assert_eq!(ok.code, 0, "a fresh token of the same service: {ok:?}");

    let started = Instant::now();
    let status = loop {
        match tokio::time::timeout(WAIT, expiring.rx.next())
            .await
            .expect("the unrefreshed stream ends within the wait")
        {
            Some(Ok(_)) => continue,
            Some(Err(status)) => break status,
            None => panic!("the stream must end with UNAUTHENTICATED"),
        }
    };
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(4));
    // Past the first token's expiry, the refreshed stream still works.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        refreshed
            .barrier(9)
            .await
            .iter()
            .all(|o| !matches!(o, Out::Ended(_)))
    );
    let x = app.presence_of(&app.service_caller(), X).await;
    assert_eq!(
        x.status(),
        Offline,
        "the expired stream's session went with it"
    );
    let w = app.presence_of(&app.service_caller(), W).await;
    assert_eq!(
        w.status(),
        Online,
        "the refreshed stream's session is still there"
    );
}
