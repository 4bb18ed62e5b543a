//! The scenarios, in the order `all` runs them.

mod access;
pub mod build;
mod cold_start;
mod mount_time;
mod p2p;
mod push;
mod python;
mod seq_read;
mod sweep;
mod tree_walk;
mod warm_run;

use crate::scenario::Scenario;
use crate::testbed::{AI, ImageScenario, PYTHON};

/// Every scenario, cheapest first within each group.
pub fn all() -> Vec<Box<dyn Scenario>> {
    vec![
        Box::new(build::Build),
        Box::new(sweep::BuildSweep),
        Box::new(mount_time::MountTime),
        Box::new(seq_read::SeqRead),
        Box::new(tree_walk::TreeWalk),
        Box::new(python::Python),
        Box::new(ImageScenario {
            name: "cold-start",
            title: "Cold start of python from a registry over a 100 Mbit/s and 1 Gbit/s link \
                    (issues 4, 5)",
            image: &PYTHON,
            run: cold_start::run,
        }),
        Box::new(ImageScenario {
            name: "warm-run",
            title: "Warm run of python, everything local (issue 5)",
            image: &PYTHON,
            run: warm_run::run,
        }),
        Box::new(push::Push),
        Box::new(p2p::P2p),
        Box::new(ImageScenario {
            name: "cold-start-ai",
            title: "Cold start of the AI inference image (tensorflow) from a registry over a \
                    100 Mbit/s and 1 Gbit/s link (issue 5)",
            image: &AI,
            run: cold_start::run,
        }),
        Box::new(ImageScenario {
            name: "warm-run-ai",
            title: "Warm run of the AI inference image, everything local (issue 5)",
            image: &AI,
            run: warm_run::run,
        }),
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
