//! Devices: a device connects (its user is online from its welcome on), changes activity
//! (auto-away; a backgrounded device is passive and catches up with one resync when it comes
//! back), and leaves (with the anti-flap grace when it was the user's last).
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::domain::{Activity, Platform, PresenceView, UserId, now_millis};
use crate::rules::{Devices, Op};

use super::registry::{OWN, attach_watch, push_tight};
use super::subscriber::{Event, EventStream, Subscriber};
use super::timers::Timer;
use super::view::Relation;
use super::{Engine, EngineError, Result, Welcome};

/// A live device: its welcome and its stream of updates. Dropping the stream disconnects the
/// device.
pub struct DeviceSession {
    pub welcome: Welcome,
    pub stream: EventStream,
}

impl Engine {
    /// Connects a device of `user` on `platform`: the user is online from now until the returned
    /// stream is dropped.
    pub async fn connect_device(&self, user: UserId, platform: Platform) -> Result<DeviceSession> {
        if self.is_shutting_down() {
            return Err(EngineError::ShuttingDown);
        }
        let _permit = self.admit(Some(user))?;
        let contacts = self.contacts(user).await?;
        let sub = self.new_subscriber(Some(platform));
        let self_view = match self.register_device(&sub, user, &contacts).await {
            Ok(view) => view,
            Err(e) => {
                self.forget_subscriber(&sub);
                return Err(e);
            }
        };
        let engine = self.clone();
        let stream_sub = sub.clone();
        // From here on, dropping the stream (on any error too) disconnects the device.
        let stream = EventStream::new(
            sub.clone(),
            Box::new(move || engine.disconnect_device(&stream_sub, user)),
        );
        let mut ids: Vec<UserId> = contacts.iter().copied().filter(|c| *c != user).collect();
        ids.sort_unstable();
        let contacts = self.attach(&sub, &ids, |_| Relation::Contact).await?;
        Ok(DeviceSession {
            welcome: Welcome {
                connection_id: self.connection_id(&sub),
                self_view,
                contacts,
            },
            stream,
        })
    }

    /// Counts the device on its user's entry (loading it), reports the user's devices, and
    /// makes the device a watcher of its own user after that change: it learns its own state
    /// from the returned view, then every later change.
    async fn register_device(
        &self,
        sub: &Arc<Subscriber>,
        user: UserId,
        contacts: &super::registry::ContactSet,
    ) -> Result<PresenceView> {
        let platform = sub
            .device
            .as_ref()
            .map_or(Platform::Unspecified, |d| d.platform);
        /// What registering found, decided under the user's lock.
        enum Step {
            NotLoaded,
            Registered(PresenceView),
            Report(Op),
        }
        for _ in 0..4 {
            let now = now_millis();
            let step = {
                let mut guard = self.shard(user);
                let shard = &mut *guard;
                match shard.users.get_mut(&user) {
                    None => Step::NotLoaded,
                    Some(entry) => {
                        let limit = self.shared.config.max_devices;
                        if entry.local().total >= limit {
                            return Err(EngineError::TooManyDevices { user, limit });
                        }
                        if !sub.track(user) {
                            return Err(EngineError::Closed);
                        }
                        entry
                            .local_mut()
                            .add(&Devices::one(Activity::Active, platform));
                        let first = entry.local().total == 1;
                        sub.set_own_last_seen(entry.presence().privacy.last_seen);
                        let audience = entry.audience();
                        push_tight(&mut audience.followers, sub.clone());
                        push_tight(&mut audience.viewers, sub.clone());
                        if audience.contacts.is_none() {
                            audience.contacts = Some(contacts.clone());
                        }
                        let c = &self.shared.counters;
                        c.connections.fetch_add(1, Ordering::Relaxed);
                        if first {
                            c.online_users.fetch_add(1, Ordering::Relaxed);
                        }
                        let op = self.device_report(entry, None);
                        if self.is_cluster() {
                            Step::Report(op)
                        } else {
                            self.apply_in(shard, user, &op, now);
                            let entry = shard
                                .users
                                .get_mut(&user)
                                .expect("the entry was there a moment ago, under the same lock");
                            Step::Registered(attach_watch(entry, user, sub, Relation::Own, now))
                        }
                    }
                }
            };
            match step {
                Step::NotLoaded => self.ensure_loaded(&[user]).await?,
                Step::Registered(view) => return Ok(view),
                Step::Report(op) => {
                    self.change(user, op).await;
                    let mut shard = self.shard(user);
                    let entry = shard
                        .users
                        .get_mut(&user)
                        .expect("an entry with a live device is never evicted");
                    return Ok(attach_watch(entry, user, sub, Relation::Own, now_millis()));
                }
            }
        }
        Err(EngineError::Unstable(user))
    }

    /// The device's stream was dropped: it leaves; if it was the user's last, the grace runs.
    pub(super) fn disconnect_device(&self, sub: &Arc<Subscriber>, user: UserId) {
        let activity = sub.activity();
        let platform = sub
            .device
            .as_ref()
            .map_or(Platform::Unspecified, |d| d.platform);
        // Remove the device from the user's watchers first: the change is for the others.
        self.forget_subscriber(sub);
        let c = &self.shared.counters;
        c.connections.fetch_sub(1, Ordering::Relaxed);
        let grace = self.shared.config.offline_grace;
        let use_grace = !grace.is_zero() && !self.is_shutting_down();
        let token = self.shared.next_grace_token.fetch_add(1, Ordering::Relaxed);
        let now = now_millis();
        let report = {
            let mut guard = self.shard(user);
            let shard = &mut *guard;
            let Some(entry) = shard.users.get_mut(&user) else {
                return;
            };
            let had = entry.local().total;
            entry.local_mut().remove(&Devices::one(activity, platform));
            // (After a shutdown took every device offline, a stream dropped late finds none.)
            let last = had > 0 && entry.local().total == 0;
            let op = self.device_report(entry, (last && use_grace).then_some(token));
            entry.tidy();
            if last {
                c.online_users.fetch_sub(1, Ordering::Relaxed);
                shard.idle.push(user);
            }
            if self.is_cluster() {
                Some(op)
            } else {
                self.apply_in(shard, user, &op, now);
                None
            }
        };
        match report {
            None => self.schedule_grace_if_ours(user, token),
            Some(op) => {
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    let engine = self.clone();
                    rt.spawn(async move {
                        engine.change(user, op).await;
                        engine.schedule_grace_if_ours(user, token);
                    });
                }
            }
        }
    }

    /// Starts the grace timer when the user's grace is the one this node started with `token`.
    fn schedule_grace_if_ours(&self, user: UserId, token: u64) {
        let since = {
            let shard = self.shard(user);
            shard.users.get(&user).and_then(|e| {
                e.presence()
                    .grace
                    .as_ref()
                    .filter(|g| g.token == token && g.node == self.shared.node)
                    .map(|g| g.since)
            })
        };
        if let Some(since) = since {
            let at = since + self.shared.config.offline_grace.as_millis() as i64;
            self.schedule(at, Timer::Grace { user, token });
        }
    }

    /// A grace ran out: the user is offline with last_seen = when their last device left.
    pub(super) async fn expire_grace(&self, user: UserId, token: u64) {
        if self.shard(user).users.contains_key(&user) {
            self.change(user, Op::Expire { token }).await;
        }
    }

    /// Records a device's activity. A device going to the background stops receiving updates
    /// (it remembers whose presence changed); coming back, it first gets one resync with the
    /// newest presence of each of them, then live updates again.
    pub async fn set_activity(&self, sub: &Arc<Subscriber>, user: UserId, activity: Activity) {
        let old = sub.swap_activity(activity);
        if old == activity {
            return;
        }
        if activity.is_passive() {
            sub.set_passive(true);
        }
        let now = now_millis();
        let report = {
            let mut guard = self.shard(user);
            let shard = &mut *guard;
            let Some(entry) = shard.users.get_mut(&user) else {
                return;
            };
            let local = entry.local_mut();
            if old.is_active() {
                local.active = local.active.saturating_sub(1);
            }
            if activity.is_active() {
                local.active += 1;
            }
            let op = self.device_report(entry, None);
            if self.is_cluster() {
                Some(op)
            } else {
                self.apply_in(shard, user, &op, now);
                None
            }
        };
        if let Some(op) = report {
            self.change(user, op).await;
        }
        if old.is_passive() && !activity.is_passive() {
            self.resync(sub);
        }
    }

    /// A passive device becomes live again: one resync with the newest view of every user it
    /// missed, then live updates. Each view is taken under its user's lock, with the device
    /// still passive; users missed again meanwhile follow as ordinary updates.
    fn resync(&self, sub: &Arc<Subscriber>) {
        let now = now_millis();
        let mut views = Vec::new();
        for user in sub.missed() {
            if let Some(view) = self.take_missed_view(sub, user, now, true) {
                views.push(view);
            }
        }
        views.sort_by_key(|v| v.user_id);
        sub.push(Event::Resync(Box::new(views)));
        sub.set_passive(false);
        for user in sub.missed() {
            if let Some(view) = self.take_missed_view(sub, user, now, false) {
                sub.push(Event::presence(view));
            }
        }
    }

    /// The current view of a missed user for `sub`, remembered as delivered. `always`: even if
    /// not newer than what the watch last got (a resync entry after a change of sight);
    /// otherwise None when a live update already carried it.
    fn take_missed_view(
        &self,
        sub: &Arc<Subscriber>,
        user: UserId,
        now: crate::domain::Millis,
        always: bool,
    ) -> Option<PresenceView> {
        let mut shard = self.shard(user);
        if !sub.take_missed(user) {
            return None;
        }
        let entry = shard.users.get_mut(&user)?;
        let presence = entry.presence().clone();
        let w = entry.watch_of(sub)?;
        w.missed_in = 0;
        let ctx = if w.relation == Relation::Own {
            OWN
        } else {
            sub.context(w.relation)
        };
        let mut view = super::view::project(user, &presence, ctx, now);
        if view.version <= w.last {
            if !always {
                return None;
            }
            view.version = w.last + 1;
        }
        w.last = view.version;
        Some(view)
    }
}
