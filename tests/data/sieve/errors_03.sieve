if header :comparator "i;nonesuch" "a" "b" { keep; }
