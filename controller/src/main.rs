fn main() {
    print!("{}", densemesh_controller::crd::crds_yaml());
}
