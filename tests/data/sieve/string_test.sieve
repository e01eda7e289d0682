require ["fileinto","variables"];
if header :matches "from" "*<*@*>" { set "dom" "${3}"; }
if string :is "${dom}" "y.example" { fileinto "FromDom"; }
