//! The contact graph and the watches it implies: a new contact is watched at once by the
//! other's devices and contact watches (starting with their current view, pushed under the
//! contact's lock so that no newer update can overtake it); a removed one becomes a stranger to
//! them, told at once when that hides something.
use std::sync::Arc;

use crate::domain::{UserId, now_millis};

use super::registry::attach_watch;
use super::subscriber::{Event, Subscriber};
use super::view::{Relation, restate};
use super::{Engine, Result};

impl Engine {
    /// Adds symmetric contact pairs; live streams of both users start receiving each other's
    /// changes at once, beginning with the other's current presence.
    pub async fn add_contacts(&self, pairs: &[(UserId, UserId)]) -> Result<()> {
        self.shared.store.add_contacts(pairs).await?;
        for &(a, b) in pairs {
            self.link(a, b).await?;
            self.link(b, a).await?;
        }
        self.publish_contacts(true, pairs).await;
        Ok(())
    }

    /// Removes symmetric contact pairs; the two users' streams stop receiving each other's
    /// changes. Each user's version moves once (on every node alike, through the backplane),
    /// so that a receiver told that it now sees less stays on the user's own numbering.
    pub async fn remove_contacts(&self, pairs: &[(UserId, UserId)]) -> Result<()> {
        self.shared.store.remove_contacts(pairs).await?;
        for &(a, b) in pairs {
            self.unlink(a, b);
            self.unlink(b, a);
        }
        self.publish_contacts(false, pairs).await;
        let mut users: Vec<UserId> = pairs.iter().flat_map(|&(a, b)| [a, b]).collect();
        users.sort_unstable();
        users.dedup();
        for chunk in users.chunks(crate::store::MAX_ROWS_PER_STATEMENT) {
            self.ensure_loaded(chunk).await?;
            for &user in chunk {
                self.change(user, crate::rules::Op::Touch).await;
            }
        }
        Ok(())
    }

    /// Up to `limit` contacts of `user` with ids above `after`, ascending.
    pub async fn list_contacts(
        &self,
        user: UserId,
        after: Option<UserId>,
        limit: u32,
    ) -> Result<Vec<UserId>> {
        Ok(self.shared.store.list_contacts(user, after, limit).await?)
    }

    /// `contact` is now a contact of `user`: every follower of `user` watches it as one.
    pub(super) async fn link(&self, user: UserId, contact: UserId) -> Result<()> {
        let followers = {
            let mut shard = self.shard(user);
            let Some(audience) = shard.users.get_mut(&user).and_then(|e| e.audience.as_mut())
            else {
                return Ok(());
            };
            let Some(contacts) = audience.contacts.as_mut() else {
                return Ok(());
            };
            if !Arc::make_mut(contacts).insert(contact) {
                return Ok(());
            }
            audience.followers.clone()
        };
        for f in followers {
            self.watch_as_contact(&f, contact).await?;
        }
        Ok(())
    }

    /// Registers `sub` on `contact` as a contact (or turns its stranger's watch into one) and
    /// pushes what it now sees, in one step under the contact's lock.
    async fn watch_as_contact(&self, sub: &Arc<Subscriber>, contact: UserId) -> Result<()> {
        for _ in 0..4 {
            {
                let mut shard = self.shard(contact);
                if let Some(entry) = shard.users.get_mut(&contact) {
                    if sub.is_closed() {
                        return Ok(());
                    }
                    let now = now_millis();
                    let presence = entry.presence().clone();
                    let view = match entry.watch_of(sub) {
                        Some(w) if w.relation == Relation::Contact => return Ok(()),
                        Some(w) => {
                            let old = super::view::project(
                                contact,
                                &presence,
                                sub.context(w.relation),
                                now,
                            );
                            w.relation = Relation::Contact;
                            let new = super::view::project(
                                contact,
                                &presence,
                                sub.context(w.relation),
                                now,
                            );
                            let pushed = restate(&old, new, w.last);
                            if let Some(v) = &pushed {
                                w.last = v.version;
                            }
                            pushed
                        }
                        None => {
                            if !sub.track(contact) {
                                return Ok(());
                            }
                            Some(attach_watch(entry, contact, sub, Relation::Contact, now))
                        }
                    };
                    if let Some(view) = view
                        && sub.push_live(Event::presence(view)).is_none()
                    {
                        sub.miss(contact);
                    }
                    return Ok(());
                }
            }
            self.ensure_loaded(&[contact]).await?;
        }
        Err(super::EngineError::Unstable(contact))
    }

    /// Makes `contact` a stranger to `user`'s subscribers. Those that follow `user`'s contacts
    /// stop watching `contact`; watches of listed ids keep watching it as a stranger. Each one
    /// whose view of `contact` changes (a contacts-only status) is told at once, with a version
    /// above what it had (the version of `contact` then moves once, see `remove_contacts`).
    pub(super) fn unlink(&self, user: UserId, contact: UserId) {
        let (viewers, followers) = {
            let mut shard = self.shard(user);
            let Some(audience) = shard.users.get_mut(&user).and_then(|e| e.audience.as_mut())
            else {
                return;
            };
            if let Some(c) = audience.contacts.as_mut() {
                Arc::make_mut(c).remove(&contact);
            }
            (audience.viewers.clone(), audience.followers.clone())
        };
        if viewers.is_empty() {
            return;
        }
        let is_in =
            |list: &[Arc<Subscriber>], s: &Arc<Subscriber>| list.iter().any(|f| Arc::ptr_eq(f, s));
        let now = now_millis();
        let mut guard = self.shard(contact);
        let shard = &mut *guard;
        let Some(entry) = shard.users.get_mut(&contact) else {
            return;
        };
        let presence = entry.presence().clone();
        entry.watchers.retain_mut(|w| {
            if w.relation != Relation::Contact || !is_in(&viewers, &w.sub) {
                return true;
            }
            let old =
                super::view::project(contact, &presence, w.sub.context(Relation::Contact), now);
            let new =
                super::view::project(contact, &presence, w.sub.context(Relation::Stranger), now);
            if let Some(view) = restate(&old, new, w.last) {
                w.last = view.version;
                if w.sub.push_live(Event::presence(view)).is_none() {
                    w.sub.miss_once(contact, &mut w.missed_in);
                }
            }
            if is_in(&followers, &w.sub) {
                w.sub.untrack(contact);
                w.sub.set_floor(contact, w.last);
                false
            } else {
                w.relation = Relation::Stranger;
                true
            }
        });
        if entry.is_idle() {
            shard.idle.push(contact);
        }
    }
}
