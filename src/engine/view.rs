//! Privacy projection: what one viewer may see of one user. Pure functions, so every rule of the
//! privacy matrix is unit-tested here and holds on every read and push path alike.
use crate::domain::{Millis, PresenceView, Privacy, Status, UserId, Visibility};

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

/// The whole truth about a user at one instant: the input of every projection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserState {
    pub user_id: UserId,
    /// OFFLINE when no live device (or invisible), otherwise the chosen status.
    pub effective: Status,
    /// At least one live device, even while invisible.
    pub connected: bool,
    pub last_seen: Option<Millis>,
    /// last_seen as of the last time the user went visibly offline: what a viewer who may see
    /// last_seen but not the online status is shown, so that going online does not leak through
    /// a fresh last_seen.
    pub last_offline: Option<Millis>,
    pub version: u64,
    /// The version of the last visible offline transition: the version shown to a viewer who
    /// may see last_seen but not the online status, so that it does not reveal changes hidden
    /// from them.
    pub offline_version: u64,
    pub privacy: Privacy,
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
}

/// What the viewer may see of the user: OFFLINE for a hidden online status, no last_seen when
/// hidden, and version 0 when nothing at all is visible, exactly like a never-seen user.
pub fn project(state: &UserState, viewer: ViewerContext) -> PresenceView {
    let (see_online, see_last_seen) = match viewer.relation {
        Relation::Own | Relation::Service => (true, true),
        Relation::Contact | Relation::Stranger => {
            let is_contact = viewer.relation == Relation::Contact;
            (
                state.privacy.online.allows(is_contact),
                state.privacy.last_seen.allows(is_contact)
                    && viewer.own_last_seen.allows(is_contact),
            )
        }
    };
    if !see_online && !see_last_seen {
        return PresenceView::unknown(state.user_id);
    }
    let status = if see_online {
        state.effective
    } else {
        Status::Offline
    };
    let (last_seen, version) = match (see_last_seen, see_online) {
        (false, _) => (None, state.version),
        (true, true) => (state.last_seen, state.version),
        (true, false) => (state.last_offline, state.offline_version),
    };
    PresenceView {
        user_id: state.user_id,
        status,
        last_seen,
        version,
        connected: (viewer.relation == Relation::Service).then_some(state.connected),
    }
}

/// The update a watcher is pushed when the user's state goes from `before` to `after`, if what
/// it may see changed. The pushed view carries the current version even when it now hides
/// everything (the viewer that loses access must still accept it as newer).
pub fn update_for(
    before: &UserState,
    after: &UserState,
    viewer: ViewerContext,
) -> Option<PresenceView> {
    let old = project(before, viewer);
    let mut new = project(after, viewer);
    if old.status == new.status && old.last_seen == new.last_seen {
        return None;
    }
    new.version = after.version;
    Some(new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use Visibility::*;

    fn state(online: Visibility, last_seen: Visibility) -> UserState {
        UserState {
            user_id: UserId::parse(9).unwrap(),
            effective: Status::Busy,
            connected: true,
            last_seen: Some(2_000),
            last_offline: Some(1_000),
            version: 7,
            offline_version: 5,
            privacy: Privacy { online, last_seen },
        }
    }

    fn viewer(relation: Relation, own_last_seen: Visibility) -> ViewerContext {
        ViewerContext {
            relation,
            own_last_seen,
        }
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
            let v = project(&state(online, last_seen), viewer(relation, Everyone));
            let case = format!("{online:?}/{last_seen:?} seen by {relation:?}");
            assert_eq!(v.status == Status::Busy, see_status, "status: {case}");
            assert_eq!(v.last_seen.is_some(), see_last_seen, "last_seen: {case}");
            assert_eq!(v.connected, None, "users never see `connected`: {case}");
            if !see_status && !see_last_seen {
                assert_eq!(
                    v,
                    PresenceView::unknown(v.user_id),
                    "hidden = never seen: {case}"
                );
            }
        }
    }

    #[test]
    fn a_hidden_online_status_shows_the_last_offline_time_not_a_fresh_last_seen() {
        let v = project(
            &state(Nobody, Everyone),
            viewer(Relation::Contact, Everyone),
        );
        assert_eq!(v.status, Status::Offline);
        assert_eq!(
            v.last_seen,
            Some(1_000),
            "going online must not leak via last_seen"
        );
        assert_eq!(v.version, 5, "nor via the version");
    }

    #[test]
    fn reciprocity_hides_last_seen_from_those_who_hide_theirs() {
        let s = state(Everyone, Everyone);
        assert_eq!(
            project(&s, viewer(Relation::Contact, Nobody)).last_seen,
            None
        );
        assert_eq!(
            project(&s, viewer(Relation::Stranger, Contacts)).last_seen,
            None
        );
        assert!(
            project(&s, viewer(Relation::Contact, Contacts))
                .last_seen
                .is_some()
        );
        assert_eq!(
            project(&s, viewer(Relation::Contact, Nobody)).status,
            Status::Busy,
            "reciprocity is about last_seen only"
        );
    }

    #[test]
    fn services_and_own_devices_see_everything() {
        let s = state(Nobody, Nobody);
        let svc = project(&s, ViewerContext::SERVICE);
        assert_eq!((svc.status, svc.connected), (Status::Busy, Some(true)));
        let own = project(&s, ViewerContext::OWN);
        assert_eq!(
            (own.status, own.last_seen, own.connected),
            (Status::Busy, Some(2_000), None)
        );
    }

    #[test]
    fn no_update_is_pushed_when_nothing_visible_changed() {
        let before = state(Nobody, Nobody);
        let mut after = before;
        after.effective = Status::Offline;
        after.version += 1;
        assert_eq!(
            update_for(&before, &after, viewer(Relation::Contact, Everyone)),
            None
        );
        let pushed = update_for(&before, &after, ViewerContext::SERVICE).unwrap();
        assert_eq!(pushed.version, 8);
    }

    #[test]
    fn losing_access_pushes_the_hidden_view_with_the_current_version() {
        let before = state(Contacts, Contacts);
        let mut after = before;
        after.privacy = Privacy {
            online: Nobody,
            last_seen: Nobody,
        };
        after.version += 1;
        let pushed = update_for(&before, &after, viewer(Relation::Contact, Everyone)).unwrap();
        assert_eq!(
            (pushed.status, pushed.last_seen, pushed.version),
            (Status::Offline, None, 8)
        );
    }
}
