//! A user's contacts as the engine caches them: a sorted list of ids.
//!
//! Cached for every user with a device online, so it is memory per stream: a `HashSet` of 50
//! ids took about 600 bytes (64 buckets and their control bytes), the sorted list takes 400.
//! Membership is a binary search; the list is read far more often than it changes (a contact
//! added or removed), and a change copies it at most once (`Arc::make_mut`).
use crate::domain::UserId;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContactList(Vec<UserId>);

impl ContactList {
    pub fn contains(&self, user: &UserId) -> bool {
        self.0.binary_search(user).is_ok()
    }

    /// Adds `user`; false when it was there already.
    pub fn insert(&mut self, user: UserId) -> bool {
        match self.0.binary_search(&user) {
            Ok(_) => false,
            Err(i) => {
                self.0.insert(i, user);
                true
            }
        }
    }

    /// Removes `user`; false when it was not there.
    pub fn remove(&mut self, user: &UserId) -> bool {
        match self.0.binary_search(user) {
            Ok(i) => {
                self.0.remove(i);
                true
            }
            Err(_) => false,
        }
    }

    /// In ascending order.
    pub fn iter(&self) -> impl Iterator<Item = &UserId> {
        self.0.iter()
    }
}

impl FromIterator<UserId> for ContactList {
    fn from_iter<I: IntoIterator<Item = UserId>>(iter: I) -> Self {
        let mut ids: Vec<UserId> = iter.into_iter().collect();
        ids.sort_unstable();
        ids.dedup();
        ids.shrink_to_fit();
        ContactList(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(list: &ContactList) -> Vec<u64> {
        list.iter().map(|u| u.get()).collect()
    }

    fn u(id: u64) -> UserId {
        UserId::parse(id).unwrap()
    }

    #[test]
    fn a_list_is_sorted_without_duplicates_and_answers_membership() {
        let mut list: ContactList = [5, 3, 9, 3].into_iter().map(u).collect();
        assert_eq!(ids(&list), vec![3, 5, 9]);
        assert!(list.contains(&u(5)) && !list.contains(&u(4)));
        assert!(list.insert(u(4)));
        assert!(!list.insert(u(4)), "already there");
        assert_eq!(ids(&list), vec![3, 4, 5, 9]);
        assert!(list.remove(&u(3)));
        assert!(!list.remove(&u(3)), "already gone");
        assert_eq!(ids(&list), vec![4, 5, 9]);
    }
}
