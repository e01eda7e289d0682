require "fileinto";
if true {
  fileinto :bogus "x";
}
