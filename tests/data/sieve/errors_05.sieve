require "relational";
if header :value "zz" "a" "1" { keep; }
