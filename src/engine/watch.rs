//! Watchers: receivers registered on the users they watch (devices on their contacts,
//! WatchContacts streams on contacts or listed ids), and the reads that answer GetPresence.
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::domain::{Platform, PresenceView, UserId, Viewer, Visibility, now_millis};

use super::registry::{ContactSet, attach_watch, push_tight};
use super::subscriber::{EventStream, Subscriber};
use super::view::{Relation, ViewerContext, project};
use super::{Engine, EngineError, Result};

/// How one viewer relates to the users it looks at.
pub(super) enum ViewerContexts {
    Service,
    User {
        me: UserId,
        contacts: ContactSet,
        own_last_seen: Visibility,
    },
    /// Everyone looked at is a contact (a contacts watch).
    ContactsOnly,
}

impl ViewerContexts {
    pub fn relation(&self, user: UserId) -> Relation {
        match self {
            ViewerContexts::Service => Relation::Service,
            ViewerContexts::ContactsOnly => Relation::Contact,
            ViewerContexts::User { me, contacts, .. } => {
                if *me == user {
                    Relation::Own
                } else if contacts.contains(&user) {
                    Relation::Contact
                } else {
                    Relation::Stranger
                }
            }
        }
    }

    pub fn for_user(&self, user: UserId) -> ViewerContext {
        match (self, self.relation(user)) {
            (_, Relation::Own) => ViewerContext::OWN,
            (_, Relation::Service) => ViewerContext::SERVICE,
            (ViewerContexts::User { own_last_seen, .. }, relation) => ViewerContext {
                relation,
                own_last_seen: *own_last_seen,
            },
            (_, relation) => ViewerContext {
                relation,
                own_last_seen: Visibility::Everyone,
            },
        }
    }
}

impl Engine {
    pub(super) fn new_subscriber(&self, device: Option<Platform>) -> Arc<Subscriber> {
        let id = self.shared.next_subscriber.fetch_add(1, Ordering::Relaxed);
        let sub = Arc::new(Subscriber::new(
            id,
            self.shared.config.queue_capacity,
            self.shared.batcher.clone(),
            device,
        ));
        self.shared
            .subscribers
            .lock()
            .expect("subscribers lock poisoned")
            .insert(id, Arc::downgrade(&sub));
        sub
    }

    /// Closes a subscriber and removes it from every user it was registered on.
    pub(super) fn forget_subscriber(&self, sub: &Arc<Subscriber>) {
        for u in sub.close() {
            let mut shard = self.shard(u);
            if let Some(e) = shard.users.get_mut(&u) {
                e.detach(sub);
                if e.is_idle() {
                    shard.idle.push(u);
                }
            }
        }
        self.shared
            .subscribers
            .lock()
            .expect("subscribers lock poisoned")
            .remove(&sub.id());
    }

    /// The user's contacts: from the cache when a follower keeps it, else from the store.
    pub(super) async fn contacts(&self, user: UserId) -> Result<ContactSet> {
        if let Some(c) = self
            .shard(user)
            .users
            .get(&user)
            .and_then(|e| e.audience.as_ref()?.contacts.clone())
        {
            return Ok(c);
        }
        Ok(self.shared.reads.contacts(user).await?)
    }

    /// Registers `sub` as a watcher of each user (loading missing ones) and returns what it may
    /// see of each, in the given order.
    pub(super) async fn attach(
        &self,
        sub: &Arc<Subscriber>,
        users: &[UserId],
        relation: impl Fn(UserId) -> Relation,
    ) -> Result<Vec<PresenceView>> {
        let mut views: Vec<Option<PresenceView>> = vec![None; users.len()];
        let mut pending: Vec<usize> = (0..users.len()).collect();
        for _ in 0..4 {
            let now = now_millis();
            let mut missing = Vec::new();
            for i in pending {
                let u = users[i];
                let mut shard = self.shard(u);
                let Some(entry) = shard.users.get_mut(&u) else {
                    missing.push(i);
                    continue;
                };
                if !sub.track(u) {
                    return Err(EngineError::Closed);
                }
                views[i] = Some(attach_watch(entry, u, sub, relation(u), now));
            }
            if missing.is_empty() {
                return Ok(views
                    .into_iter()
                    .map(|v| v.expect("every view filled"))
                    .collect());
            }
            let ids: Vec<UserId> = missing.iter().map(|&i| users[i]).collect();
            self.ensure_loaded(&ids).await?;
            pending = missing;
        }
        Err(EngineError::Unstable(users[pending[0]]))
    }

    /// Registers `sub` as looking through `me`'s eyes (it follows `me`'s own privacy); with
    /// `follow`, also as following `me`'s contacts. `watch`: counts as one of `me`'s watches.
    async fn attach_viewer(
        &self,
        sub: &Arc<Subscriber>,
        me: UserId,
        follow: Option<&ContactSet>,
    ) -> Result<()> {
        for _ in 0..4 {
            {
                let mut shard = self.shard(me);
                if let Some(entry) = shard.users.get_mut(&me) {
                    let limit = self.shared.config.max_watches;
                    if entry.audience.as_ref().is_some_and(|a| a.watches >= limit) {
                        return Err(EngineError::TooManyWatches { user: me, limit });
                    }
                    if !sub.track(me) {
                        return Err(EngineError::Closed);
                    }
                    sub.set_own_last_seen(entry.presence().privacy.last_seen);
                    let audience = entry.audience();
                    audience.watches += 1;
                    push_tight(&mut audience.viewers, sub.clone());
                    if let Some(contacts) = follow {
                        push_tight(&mut audience.followers, sub.clone());
                        if audience.contacts.is_none() {
                            audience.contacts = Some(contacts.clone());
                        }
                    }
                    return Ok(());
                }
            }
            self.ensure_loaded(&[me]).await?;
        }
        Err(EngineError::Unstable(me))
    }

    /// How `viewer` relates to anyone: its contacts and own last_seen setting.
    async fn viewer_contexts(&self, viewer: Viewer) -> Result<ViewerContexts> {
        match viewer {
            Viewer::Service => Ok(ViewerContexts::Service),
            Viewer::User(me) => {
                let contacts = self.contacts(me).await?;
                let own_last_seen = self.privacy(me).await?.last_seen;
                Ok(ViewerContexts::User {
                    me,
                    contacts,
                    own_last_seen,
                })
            }
        }
    }

    /// Opens a watch: of the viewer's contacts when `users` is empty (following later contact
    /// changes), else of the listed users. Returns the stream and the snapshot. The watcher is
    /// not counted online.
    pub async fn watch(
        &self,
        viewer: Viewer,
        users: &[UserId],
    ) -> Result<(EventStream, Vec<PresenceView>)> {
        if self.is_shutting_down() {
            return Err(EngineError::ShuttingDown);
        }
        let me = match viewer {
            Viewer::User(me) => Some(me),
            Viewer::Service => None,
        };
        let _permit = self.admit(me)?;
        let mut seen = HashSet::new();
        let mut ids: Vec<UserId> = users.iter().copied().filter(|u| seen.insert(*u)).collect();
        let sub = self.new_subscriber(None);
        let ctx = match (me, ids.is_empty()) {
            (Some(me), true) => {
                let contacts = self.contacts(me).await?;
                ids = contacts.iter().copied().filter(|c| *c != me).collect();
                ids.sort_unstable();
                if let Err(e) = self.attach_viewer(&sub, me, Some(&contacts)).await {
                    self.forget_subscriber(&sub);
                    return Err(e);
                }
                ViewerContexts::ContactsOnly
            }
            _ => {
                let ctx = self.viewer_contexts(viewer).await?;
                if let Some(me) = me
                    && let Err(e) = self.attach_viewer(&sub, me, None).await
                {
                    self.forget_subscriber(&sub);
                    return Err(e);
                }
                ctx
            }
        };
        self.shared
            .counters
            .watchers
            .fetch_add(1, Ordering::Relaxed);
        let engine = self.clone();
        let stream_sub = sub.clone();
        let stream = EventStream::new(
            sub.clone(),
            Box::new(move || {
                if let Some(me) = me {
                    let mut shard = engine.shard(me);
                    if let Some(e) = shard.users.get_mut(&me) {
                        if let Some(a) = e.audience.as_mut() {
                            a.watches = a.watches.saturating_sub(1);
                        }
                        e.tidy();
                    }
                }
                engine.forget_subscriber(&stream_sub);
                engine
                    .shared
                    .counters
                    .watchers
                    .fetch_sub(1, Ordering::Relaxed);
            }),
        );
        let views = self.attach(&sub, &ids, |u| ctx.relation(u)).await?;
        Ok((stream, views))
    }

    /// Presence of each distinct user, in request order, as `viewer` may see it. Users in memory
    /// are answered from memory; the rest with one read (backplane, then store), without
    /// keeping them.
    pub async fn get_presence(
        &self,
        viewer: Viewer,
        users: &[UserId],
    ) -> Result<Vec<PresenceView>> {
        let mut seen = HashSet::with_capacity(users.len());
        let ids: Vec<UserId> = users.iter().copied().filter(|u| seen.insert(*u)).collect();
        let ctx = self.viewer_contexts(viewer).await?;
        let now = now_millis();
        let mut out: Vec<Option<PresenceView>> = Vec::with_capacity(ids.len());
        let mut missing = Vec::new();
        for (i, &u) in ids.iter().enumerate() {
            let shard = self.shard(u);
            match shard.users.get(&u) {
                Some(e) => out.push(Some(e.view(u, ctx.for_user(u), now))),
                None => {
                    out.push(None);
                    missing.push(i);
                }
            }
        }
        if !missing.is_empty() {
            let want: Vec<UserId> = missing.iter().map(|&i| ids[i]).collect();
            let loaded = self.read_presence(&want).await?;
            for i in missing {
                let u = ids[i];
                out[i] = Some(match loaded.get(&u) {
                    Some(p) => project(u, p, ctx.for_user(u), now),
                    None => project(u, super::registry::never_seen(), ctx.for_user(u), now),
                });
            }
        }
        Ok(out
            .into_iter()
            .map(|v| v.expect("every view filled"))
            .collect())
    }
}
