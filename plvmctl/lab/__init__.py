"""The laboratory, apart from the product: the toy world (`toy`), the pocket model's build
(`pocket`) with its base-LVLM pretraining (`lvlm`) and reference-encoder training (`encoder`),
`make results` (`results`) and `make demo` (`demo`). The product never imports this package;
the `pocket` recipe only names the assets it wrote (plvmctl/assets/pocket)."""
