fn main() {
    println!("keyraft {}", env!("CARGO_PKG_VERSION"));
}
