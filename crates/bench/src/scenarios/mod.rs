//! The scenarios, in the order `all` runs them.

mod access;
pub mod build;
mod mount_time;
mod python;
mod seq_read;
mod sweep;
mod tree_walk;

use crate::scenario::Scenario;

/// Every scenario, cheapest first within each group.
pub fn all() -> Vec<Box<dyn Scenario>> {
    vec![
        Box::new(build::Build),
        Box::new(sweep::BuildSweep),
        Box::new(mount_time::MountTime),
        Box::new(seq_read::SeqRead),
        Box::new(tree_walk::TreeWalk),
        Box::new(python::Python),
    ]
}

#[cfg(test)]
mod tests {
    #[test]
    fn scenario_names_are_unique_and_not_all() {
        let names: Vec<&str> = super::all().iter().map(|s| s.name()).collect();
        let unique: std::collections::BTreeSet<&&str> = names.iter().collect();
        assert_eq!(unique.len(), names.len(), "{names:?}");
        assert!(!names.contains(&"all"));
    }
}
