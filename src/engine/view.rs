//! Privacy projection: what one viewer may see of one user. Pure functions, so every rule of the
//! privacy matrix is unit-tested here and holds on every read and push path alike.
//!
//! Versions: a viewer who may see the online status gets the user's version; one who may see
//! only the last_seen gets the offline numbering (it moves only when that last_seen moves, so it
//! tells nothing of hidden changes); one who may see nothing gets 0. A receiver whose sight
//! changes (a privacy setting, a contact added or removed) is pushed its new view with a
//! version above everything it had, see [`update_for`].
use crate::domain::{LastSeenApprox, Millis, PresenceView, Status, UserId, Visibility};
use crate::rules::{Presence, Sight};

/// What a watcher is to the user it watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relation {
    /// The user's own device or stream: sees everything but the service-only `connected` flag.
    Own,
    Contact,
    Stranger,
    /// A service caller not acting for a user: no filtering, plus `connected`.
    Service,
}

/// The viewer's side of a projection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ViewerContext {
    pub relation: Relation,
    /// The viewer's own last_seen setting: reciprocity hides from them the last_seen of everyone
    /// they hide theirs from.
    pub own_last_seen: Visibility,
}

impl ViewerContext {
    pub const SERVICE: ViewerContext = ViewerContext {
        relation: Relation::Service,
        own_last_seen: Visibility::Everyone,
    };
    pub const OWN: ViewerContext = ViewerContext {
        relation: Relation::Own,
        own_last_seen: Visibility::Everyone,
    };

    fn sight(&self, p: &Presence) -> Sight {
        match self.relation {
            Relation::Own | Relation::Service => Sight::ALL,
            Relation::Contact | Relation::Stranger => Sight::of(
                &p.privacy,
                self.relation == Relation::Contact,
                self.own_last_seen,
            ),
        }
    }
}

/// What the viewer may see of the user at `now`: OFFLINE for a hidden online status, no exact
/// last_seen when hidden (a coarse one instead when allowed), and version 0 when nothing at all
/// is visible, exactly like a never-seen user.
pub fn project(user_id: UserId, p: &Presence, viewer: ViewerContext, now: Millis) -> PresenceView {
    let sight = viewer.sight(p);
    if !sight.online && !sight.exact_last_seen {
        return PresenceView::unknown(user_id);
    }
    let last_seen = match (sight.exact_last_seen, sight.online) {
        (false, _) => None,
        (true, true) => p.last_seen,
        (true, false) => p.last_offline,
    };
    if !sight.online && last_seen.is_none() {
        // Allowed only the last_seen of someone never seen offline: nothing to show.
        return PresenceView::unknown(user_id);
    }
    let approx = if sight.approx_last_seen {
        p.last_seen.map(|t| LastSeenApprox::of(t, now))
    } else {
        None
    };
    let (status, version) = if sight.online {
        (p.effective(), p.version)
    } else {
        (Status::Offline, p.offline_version)
    };
    PresenceView {
        user_id,
        status,
        last_seen,
        version,
        connected: (viewer.relation == Relation::Service).then(|| p.connected()),
        platforms: if sight.online {
            p.platforms()
        } else {
            Default::default()
        },
        idle_since: if sight.online { p.idle_since() } else { None },
        custom: if sight.online {
            p.custom.clone().filter(|c| c.is_live(now))
        } else {
            None
        },
        last_seen_approx: approx,
    }
}

/// The update a watcher is pushed when the user's state goes from `before` to `after`, if what
/// it may see changed. `last` is the version this receiver last got of the user: the pushed
/// version is always above it, and when the receiver could see the online status before, at
/// least the user's current version (a receiver that loses access learns it at the version of
/// the change that took it away).
pub fn update_for(
    user_id: UserId,
    before: &Presence,
    after: &Presence,
    viewer: ViewerContext,
    last: u64,
    now: Millis,
) -> Option<PresenceView> {
    change_for(user_id, before, after, viewer, now).map(|v| above(v, last))
}

/// [`update_for`] before the receiver's own `last` is taken into account: the same for every
/// receiver with this viewer context, so fan-out computes it once per context.
pub fn change_for(
    user_id: UserId,
    before: &Presence,
    after: &Presence,
    viewer: ViewerContext,
    now: Millis,
) -> Option<PresenceView> {
    let old = project(user_id, before, viewer, now);
    let mut new = project(user_id, after, viewer, now);
    // A custom status is hidden from the moment it expires, in both views alike; the change
    // that clears it at that moment is still news to whoever could see it.
    let custom_changed = viewer.sight(after).online && before.custom != after.custom;
    if old.same_content(&new) && !custom_changed {
        return None;
    }
    if viewer.sight(before).online {
        new.version = new.version.max(after.version);
    }
    Some(new)
}

/// `view` as a receiver that last got version `last` of the user must be pushed it.
pub fn above(mut view: PresenceView, last: u64) -> PresenceView {
    view.version = view.version.max(last + 1);
    view
}

/// The view a receiver gets when it starts watching, or when its relation changes without the
/// user's state changing (a contact added or removed): pushed only if it differs from what the
/// receiver had, with a version above `last`.
pub fn restate(old: &PresenceView, new: PresenceView, last: u64) -> Option<PresenceView> {
    if old.same_content(&new) {
        return None;
    }
    Some(above(new, last))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Activity, Platform, Privacy};
    use crate::rules::{Devices, NodeDevices};
    use Visibility::*;

    const NOW: Millis = 10_000;

    fn user() -> UserId {
        UserId::parse(9).unwrap()
    }

    fn state(online: Visibility, last_seen: Visibility) -> Presence {
        Presence {
            chosen: Status::Busy,
            last_seen: Some(2_000),
            last_offline: Some(1_000),
            version: 7,
            offline_version: 2,
            privacy: Privacy {
                online,
                last_seen,
                approximate_last_seen: false,
            },
            nodes: vec![NodeDevices {
                node: "a".into(),
                seq: 1,
                devices: Devices::one(Activity::Active, Platform::Mobile),
            }],
            ..Presence::default()
        }
    }

    fn viewer(relation: Relation, own_last_seen: Visibility) -> ViewerContext {
        ViewerContext {
            relation,
            own_last_seen,
        }
    }

    fn see(p: &Presence, v: ViewerContext) -> PresenceView {
        project(user(), p, v, NOW)
    }

    #[test]
    fn the_privacy_matrix_holds_for_contacts_and_strangers() {
        // (online setting, last_seen setting, relation) -> (status visible, last_seen visible)
        let cases = [
            (Everyone, Everyone, Relation::Stranger, true, true),
            (Everyone, Everyone, Relation::Contact, true, true),
            (Contacts, Contacts, Relation::Stranger, false, false),
            (Contacts, Contacts, Relation::Contact, true, true),
            (Nobody, Nobody, Relation::Contact, false, false),
            (Nobody, Everyone, Relation::Stranger, false, true),
            (Everyone, Nobody, Relation::Contact, true, false),
            (Contacts, Nobody, Relation::Stranger, false, false),
        ];
        for (online, last_seen, relation, see_status, see_last_seen) in cases {
            let v = see(&state(online, last_seen), viewer(relation, Everyone));
            let case = format!("{online:?}/{last_seen:?} seen by {relation:?}");
            assert_eq!(v.status == Status::Busy, see_status, "status: {case}");
            assert_eq!(v.last_seen.is_some(), see_last_seen, "last_seen: {case}");
            assert_eq!(v.connected, None, "users never see `connected`: {case}");
            assert_eq!(
                !v.platforms.is_empty(),
                see_status,
                "platforms follow the status: {case}"
            );
            if !see_status && !see_last_seen {
                assert_eq!(
                    v,
                    PresenceView::unknown(user()),
                    "hidden = never seen: {case}"
                );
            }
        }
    }

    #[test]
    fn a_hidden_online_status_shows_the_last_offline_time_and_its_own_numbering() {
        let v = see(
            &state(Nobody, Everyone),
            viewer(Relation::Contact, Everyone),
        );
        assert_eq!(v.status, Status::Offline);
        assert_eq!(
            v.last_seen,
            Some(1_000),
            "going online must not leak via last_seen"
        );
        assert_eq!(v.version, 2, "nor via the version: the offline numbering");
    }

    #[test]
    fn reciprocity_hides_last_seen_from_those_who_hide_theirs() {
        let s = state(Everyone, Everyone);
        assert_eq!(see(&s, viewer(Relation::Contact, Nobody)).last_seen, None);
        assert_eq!(
            see(&s, viewer(Relation::Stranger, Contacts)).last_seen,
            None
        );
        assert!(
            see(&s, viewer(Relation::Contact, Contacts))
                .last_seen
                .is_some()
        );
        assert_eq!(
            see(&s, viewer(Relation::Contact, Nobody)).status,
            Status::Busy,
            "reciprocity is about last_seen only"
        );
    }

    #[test]
    fn those_denied_the_exact_last_seen_get_an_approximate_one_if_the_user_allows_it() {
        let mut s = state(Everyone, Nobody);
        s.privacy.approximate_last_seen = true;
        let v = see(&s, viewer(Relation::Contact, Everyone));
        assert_eq!(
            (v.last_seen, v.last_seen_approx),
            (None, Some(LastSeenApprox::Recently))
        );
        let v = see(
            &state(Everyone, Everyone),
            viewer(Relation::Contact, Nobody),
        );
        assert_eq!(v.last_seen_approx, None, "the user did not allow it");
        let mut hidden = state(Nobody, Nobody);
        hidden.privacy.approximate_last_seen = true;
        assert_eq!(
            see(&hidden, viewer(Relation::Contact, Everyone)),
            PresenceView::unknown(user()),
            "never for those denied the online status"
        );
    }

    #[test]
    fn services_and_own_devices_see_everything() {
        let s = state(Nobody, Nobody);
        let svc = see(&s, ViewerContext::SERVICE);
        assert_eq!((svc.status, svc.connected), (Status::Busy, Some(true)));
        let own = see(&s, ViewerContext::OWN);
        assert_eq!(
            (own.status, own.last_seen, own.connected),
            (Status::Busy, Some(2_000), None)
        );
    }

    #[test]
    fn no_update_is_pushed_when_nothing_visible_changed() {
        let before = state(Nobody, Nobody);
        let mut after = before.clone();
        after.nodes.clear();
        after.version += 1;
        assert_eq!(
            update_for(
                user(),
                &before,
                &after,
                viewer(Relation::Contact, Everyone),
                0,
                NOW
            ),
            None
        );
        let pushed = update_for(user(), &before, &after, ViewerContext::SERVICE, 7, NOW).unwrap();
        assert_eq!(pushed.version, 8);
    }

    #[test]
    fn losing_access_pushes_the_hidden_view_at_the_current_version() {
        let before = state(Contacts, Contacts);
        let mut after = before.clone();
        after.privacy.online = Nobody;
        after.privacy.last_seen = Nobody;
        after.version += 1;
        let pushed = update_for(
            user(),
            &before,
            &after,
            viewer(Relation::Contact, Everyone),
            5,
            NOW,
        )
        .unwrap();
        assert_eq!(
            (pushed.status, pushed.last_seen, pushed.version),
            (Status::Offline, None, 8)
        );
    }

    #[test]
    fn a_receiver_moved_to_the_offline_numbering_still_gets_increasing_versions() {
        let before = state(Contacts, Everyone);
        let mut after = before.clone();
        after.privacy.online = Nobody;
        after.version += 1;
        let v = viewer(Relation::Contact, Everyone);
        let lost = update_for(user(), &before, &after, v, 7, NOW).unwrap();
        assert_eq!((lost.status, lost.version), (Status::Offline, 8));
        // The user goes offline later: a new last_offline, pushed above 8 although the offline
        // numbering is at 3.
        let mut later = after.clone();
        later.last_offline = Some(3_000);
        later.offline_version += 1;
        later.version += 2;
        let next = update_for(user(), &after, &later, v, lost.version, NOW).unwrap();
        assert_eq!(next.version, 9);
    }
}
