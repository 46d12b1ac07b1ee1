fn main() {
    println!("kflash");
}
