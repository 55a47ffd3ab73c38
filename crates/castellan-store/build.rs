//! Rebuild when a migration is added or changed: `sqlx::migrate!` embeds them at compile time
//! and stable Rust cannot tell cargo it read them.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
