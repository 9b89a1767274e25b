//! Fails the build when a module names one that is not to its left in the data flow.
#[path = "layers.rs"]
mod layers;

fn main() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let flow: &[&[&str]] = &[
        &["objects"],
        &["index"],
        &["compile"],
        &["simulate"],
        &["hints"],
        &["explain", "lint", "graph"],
    ];
    if let Err(faults) = layers::check(&src, flow) {
        panic!("the data flow runs one way:\n{faults}");
    }
}
