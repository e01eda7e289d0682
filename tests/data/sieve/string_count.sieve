require ["fileinto","variables","relational","comparator-i;ascii-numeric"];
set "e" "";
if string :count "eq" :comparator "i;ascii-numeric" ["${e}","x"] "1" { fileinto "CountOne"; }
