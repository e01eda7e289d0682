require ["vacation","variables"]; set "s" "Re"; vacation :subject "${s}: x" :handle "h" "x";
